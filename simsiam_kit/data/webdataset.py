"""The inputs people have at scale: WebDataset tar shards and lists of image paths, streamed by row range.

Specs (accepted by every ``--data`` option through :func:`simsiam_kit.data.datasets.load_dataset`)::

    shards/{00000..00099}.tar      WebDataset tar shards (img2dataset's output); brace ranges keep their
                                   zero padding, ``{a,b,c}`` lists alternatives; several braces multiply
    shards/00007.tar               one tar shard
    photos.txt                     one image path per line (``PATH`` or ``PATH<TAB>LABEL``); relative paths
                                   are relative to the list file's folder; blank lines are skipped
    photos.parquet                 a Parquet table with a string column ``path`` (and an optional integer
                                   column ``label``)

**Tar shards** follow the WebDataset convention: consecutive members sharing a key (the member path up
to the first dot of its file name, ``dir/000123`` of ``dir/000123.jpg``) form one sample; the image is
the member whose extension is an image type (``jpg``, ``jpeg``, ``png``, ``webp``, ...), the label the
integer in ``KEY.cls`` (else -1); ``KEY.json`` / ``KEY.txt`` are carried but not needed. A sample
without an image member is not an image and is not counted. An image's id is ``TAR::KEY``.

Rows are numbered across the shards in the order given (after brace expansion), so a row range maps to
one or a few tars. :class:`TarShards` scans the tar headers once (512-byte blocks; member data is
skipped) and keeps only the number of samples of each tar, so its memory is proportional to the number
of tars, not of images; a reader (:meth:`TarShards.read`) re-scans the one tar it is in and keeps that
tar's member offsets while it reads from it.

**Two ways to read tars.** ``embed`` streams them by row ranges (:class:`TarShards`: one count per tar
in memory). ``pretrain`` and the evaluations, which shuffle and need any image at any time, get a
random-access dataset (:func:`tar_dataset`: each image's tar, offset and size, read on access), so their
sharding across DDP ranks and workers and their exact resume are those of an ImageFolder.

**Damaged tars.** A tar that ends without its end-of-archive block, or whose last member runs past the
end of the file (a download cut short), or with an unreadable header, is reported with the tar's path
and the byte offset; with ``skip_bad=True`` its complete samples are used and the damage is listed in
:attr:`TarShards.damaged` instead. A corrupt image inside a tar is a decoding error of that row (see
:func:`decode_image`), handled like an unreadable file.
"""

from __future__ import annotations

import io
import itertools
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from simsiam_kit.errors import UserError

TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "pgm", "tif", "tiff")
LIST_SUFFIXES = (".txt", ".lst", ".parquet")
_BRACE_RE = re.compile(r"\{([^{}]*)\}")
_RANGE_RE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
MAX_EXPANDED = 1_000_000  # a brace pattern naming more files than this is refused


def expand_braces(pattern: str) -> list[str]:
    """``a/{00000..00002}.tar`` -> ``['a/00000.tar', 'a/00001.tar', 'a/00002.tar']``; ``{x,y}`` lists
    alternatives; several braces multiply (in order). A malformed brace is a :class:`UserError`."""
    parts, alts, pos = [], [], 0
    for m in _BRACE_RE.finditer(pattern):
        parts.append(pattern[pos : m.start()])
        body = m.group(1)
        r = _RANGE_RE.match(body)
        if r:
            a, b = int(r.group(1)), int(r.group(2))
            if b < a:
                raise UserError(f"brace range {{{body}}} in '{pattern}' runs backwards")
            width = len(r.group(1)) if r.group(1).startswith("0") else 0
            if b - a + 1 > MAX_EXPANDED:
                raise UserError(f"brace range {{{body}}} in '{pattern}' names more than {MAX_EXPANDED} files")
            alts.append([str(i).zfill(width) for i in range(a, b + 1)])
        elif "," in body:
            alts.append(body.split(","))
        else:
            raise UserError(f"brace {{{body}}} in '{pattern}': expected {{A..B}} or {{x,y,...}}")
        pos = m.end()
    rest = pattern[pos:]
    if "{" in rest or "}" in rest or any("{" in p or "}" in p for p in parts):
        raise UserError(f"unbalanced braces in '{pattern}'")
    if not alts:
        return [pattern]
    total = int(np.prod([len(a) for a in alts], dtype=np.float64))
    if total > MAX_EXPANDED:
        raise UserError(f"'{pattern}' names more than {MAX_EXPANDED} files")
    out = []
    for combo in itertools.product(*alts):
        out.append("".join(p + c for p, c in zip(parts, combo)) + rest)
    return out


class DamagedTar(UserError):
    """A tar shard cut short or damaged; a command may use its complete samples instead (``remedy``, as for an
    unreadable image: see ``simsiam_kit/cli/common.py``)."""

    remedy = "skip_bad_images"


def is_tar_spec(base: str) -> bool:
    """A spec naming tar shards: ends in ``.tar`` (possibly after a brace pattern)."""
    return str(base).lower().endswith(".tar")


def is_list_spec(base: str) -> bool:
    return Path(str(base)).suffix.lower() in LIST_SUFFIXES and Path(str(base)).expanduser().is_file()


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset key and extension of a member path: ``d/abc.seg.jpg`` -> (``d/abc``, ``seg.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


@dataclass
class TarSample:
    key: str
    image: Optional[tuple]  # (offset_data, size, ext) of the image member
    cls: Optional[tuple]  # (offset_data, size) of KEY.cls


def scan_tar(path: Path) -> tuple[list[TarSample], Optional[str]]:
    """The samples of a tar in order, and what is wrong with the tar (None when it is whole).

    Only the headers are read; a sample whose image member runs past the end of the file is dropped."""
    p = Path(path)
    try:
        size = p.stat().st_size
        tf = tarfile.open(p, "r:")
    except FileNotFoundError:
        raise UserError(f"tar shard not found: {p}") from None
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{p}: not a readable tar file ({e})") from None
    samples: list[TarSample] = []
    problem = None
    cur: Optional[TarSample] = None
    with tf:
        try:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    problem = f"member {m.name} runs past the end of the file ({size} bytes): cut short"
                    break
                key, ext = _split_key(m.name)
                if cur is None or cur.key != key:
                    if cur is not None and cur.image is not None:
                        samples.append(cur)
                    cur = TarSample(key, None, None)
                if ext in TAR_IMAGE_EXTS and cur.image is None:
                    cur.image = (m.offset_data, m.size, ext)
                elif ext == "cls":
                    cur.cls = (m.offset_data, m.size)
            end = tf.offset
        except (tarfile.TarError, OSError) as e:
            problem, end = f"unreadable after {len(samples)} samples ({e})", None
    if cur is not None and cur.image is not None:
        samples.append(cur)
    if problem is None and end is not None:
        with open(p, "rb") as f:
            f.seek(end)
            block = f.read(512)
        if len(block) < 512 or block.strip(b"\0"):
            problem = f"no end-of-archive block at byte {end} (cut short or damaged)"
    return samples, problem


def read_member(f, span: tuple) -> bytes:
    f.seek(span[0])
    return f.read(span[1])


def decode_image(data: bytes, name: str):
    """PIL image of encoded bytes (loaded), or a ``UnreadableImage`` naming ``name``."""
    from PIL import Image

    from simsiam_kit.data.datasets import UNREADABLE_IMAGE, UnreadableImage

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except Exception as e:  # PIL raises many types for truncated / corrupt data
        raise UnreadableImage(f"{UNREADABLE_IMAGE} {name}: {type(e).__name__}: {e}") from None


def _label(raw: bytes, where: str) -> int:
    try:
        v = int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{where}: expected an integer class index, got {raw[:40]!r}") from None
    if v < -1:
        raise UserError(f"{where}: class index {v} < -1")
    return v


class TarShards:
    """WebDataset tar shards as one sequence of rows (see the module docstring)."""

    def __init__(self, spec: str, skip_bad: bool = False):
        self.spec = str(spec)
        paths = [Path(u).expanduser() for u in expand_braces(self.spec)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(f"tar shard not found: {missing[0]}{more} (from '{self.spec}')")
        self.paths = paths
        self.skip_bad = skip_bad
        self.damaged: list[dict] = []
        counts = []
        for p in paths:
            samples, problem = scan_tar(p)
            if problem:
                if not skip_bad:
                    raise DamagedTar(f"{p}: {problem}; {len(samples)} complete samples before it")
                self.damaged.append({"tar": str(p), "samples": len(samples), "error": problem})
            counts.append(len(samples))
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        if self.starts[-1] == 0:
            raise UserError(f"'{self.spec}': no image samples in {len(paths)} tar file(s)")
        self._cache: tuple = (None, None)

    @property
    def name(self) -> str:
        return self.spec

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _samples(self, t: int) -> list[TarSample]:
        if self._cache[0] != t:
            self._cache = (t, scan_tar(self.paths[t])[0][: int(self.counts[t])])
        return self._cache[1]

    def read(self, start: int, stop: int) -> Iterator[tuple[int, str, int, bytes]]:
        """``(row, id, label, encoded image bytes)`` of rows ``[start, stop)``, in order."""
        row = start
        while row < stop:
            t = int(np.searchsorted(self.starts, row, side="right") - 1)
            samples = self._samples(t)
            lo, hi = row - int(self.starts[t]), min(stop, int(self.starts[t + 1])) - int(self.starts[t])
            path = self.paths[t]
            with open(path, "rb") as f:
                for s in samples[lo:hi]:
                    assert s.image is not None  # scan_tar keeps only samples that have an image member
                    sid = f"{path}::{s.key}"
                    label = _label(read_member(f, s.cls), f"{sid}.cls") if s.cls else -1
                    yield row, sid, label, read_member(f, s.image)
                    row += 1


# ------------------------------------------------------------------------------------------ path lists
def read_path_list(path: Path) -> tuple[list[str], np.ndarray]:
    """(paths, labels) of a ``.txt`` / ``.lst`` / ``.parquet`` list (see the module docstring); relative paths
    are resolved against the list file's folder, labels are -1 where none is given."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(p)
        except Exception as e:
            raise UserError(f"{p}: not a readable Parquet file ({str(e)[:200]})") from None
        if "path" not in t.column_names:
            raise UserError(f"{p}: no column 'path' (columns: {', '.join(t.column_names)[:200]})")
        paths = [str(v) for v in t.column("path").to_pylist()]
        labels = t.column("label").to_numpy(zero_copy_only=False) if "label" in t.column_names else None
        if labels is not None and not np.issubdtype(np.asarray(labels).dtype, np.integer):
            raise UserError(f"{p}: column 'label' must hold integers, got {t.schema.field('label').type}")
    else:
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"{p}: not UTF-8 text (byte at offset {e.start}); expected one image path per line"
            ) from None
        paths, labs = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            path_s, tab, lab = line.rstrip("\r").partition("\t")
            paths.append(path_s)
            if tab:
                try:
                    labs.append(int(lab))
                except ValueError:
                    raise UserError(f"{p}: line {n}: label {lab[:40]!r} is not an integer") from None
            else:
                labs.append(-1)
        labels = np.asarray(labs, dtype=np.int64)
    if not paths:
        raise UserError(f"{p}: lists no image paths")
    if any(v is None or v == "" for v in paths):
        raise UserError(f"{p}: an empty path in the list")
    base = p.parent
    paths = [v if Path(v).expanduser().is_absolute() else str(base / v) for v in paths]
    labels = np.full(len(paths), -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    return paths, labels


def load_path_list(path: Path, skip_bad_images: bool = False):
    """An :class:`~simsiam_kit.data.datasets.ImageDataset` of the files a list names (ids: the paths as listed
    after resolving), labels -1 where none is given; a listed file that does not exist is a UserError
    unless ``skip_bad_images`` (it is then skipped when read)."""
    from simsiam_kit.data.datasets import ImageDataset

    paths, labels = read_path_list(path)
    if not skip_bad_images:
        for v in paths:
            if not Path(v).expanduser().is_file():
                raise UserError(f"{path}: lists {v}, which does not exist")
    return ImageDataset(
        name=str(path), labels=labels, ids=list(paths), files=list(paths), skip_bad_images=skip_bad_images
    )


class TarMember(io.BytesIO):
    """The bytes of one tar member, named ``TAR::KEY`` (what an error about it says)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


class TarMembers(Sequence):
    """The image members of tar shards by row, read on access (``files`` of a tar dataset): each item is a
    :class:`TarMember` that PIL opens like a file. Holds three integers per image (tar, offset, size)."""

    def __init__(self, paths: list, tar: np.ndarray, offset: np.ndarray, size: np.ndarray, keys: list):
        self.paths, self.tar, self.offset, self.size, self.keys = paths, tar, offset, size, keys

    def __len__(self) -> int:
        return len(self.tar)

    def name(self, i: int) -> str:
        return f"{self.paths[int(self.tar[i])]}::{self.keys[i]}"

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        path = self.paths[int(self.tar[i])]
        with open(path, "rb") as f:
            data = read_member(f, (int(self.offset[i]), int(self.size[i])))
        return TarMember(data, self.name(i))


def tar_dataset(spec: str, skip_bad_images: bool = False, sl: Optional[slice] = None):
    """Tar shards as a random-access :class:`~simsiam_kit.data.datasets.ImageDataset` (``pretrain``, the
    evaluations): the headers of every tar are scanned once and each image's tar, offset and size kept (three
    integers per image, plus its key); an image is read when a loader asks for it (one seek and one read), so
    shuffling, the split across DDP ranks and DataLoader workers, deterministic crops and exact resume are
    those of an ImageFolder. Labels are the ``KEY.cls`` integers (-1 where a sample has none). A damaged tar is
    refused, or with ``skip_bad_images`` its complete samples are used (see :class:`TarShards`). ``sl``: only
    those rows (a slice of the spec)."""
    from simsiam_kit.data.datasets import ImageDataset

    shards = TarShards(spec, skip_bad=skip_bad_images)
    tar, offset, size, keys, labels = [], [], [], [], []
    for t, p in enumerate(shards.paths):
        samples = scan_tar(p)[0][: int(shards.counts[t])]
        with open(p, "rb") as f:
            for s in samples:
                assert s.image is not None  # scan_tar keeps only samples that have an image member
                tar.append(t)
                offset.append(s.image[0])
                size.append(s.image[1])
                keys.append(s.key)
                labels.append(_label(read_member(f, s.cls), f"{p}::{s.key}.cls") if s.cls else -1)
    keep = np.arange(len(tar))[sl] if sl is not None else np.arange(len(tar))
    if len(keep) == 0:
        raise UserError(f"dataset '{spec}' is empty" + (f" in rows [{sl.start or ''}:{sl.stop or ''}]" if sl else ""))
    members = TarMembers(
        [str(p) for p in shards.paths],
        np.asarray(tar, np.int32)[keep],
        np.asarray(offset, np.int64)[keep],
        np.asarray(size, np.int64)[keep],
        [keys[i] for i in keep],
    )
    return ImageDataset(
        name=spec + (f"[{sl.start or ''}:{sl.stop or ''}]" if sl is not None else ""),
        labels=np.asarray(labels, np.int64)[keep],
        ids=[members.name(i) for i in range(len(members))],
        files=members,
        skip_bad_images=skip_bad_images,
    )
