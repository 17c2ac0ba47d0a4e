"""Embedding shards on disk: the format, an atomic writer, a verifying reader and the one-writer lock.

An embedding run (``simsiam-kit embed``, a Ray job, anything that embeds a stream of images) writes a
directory::

    OUT/.lock                 held (flock) by the one process that writes here (see ShardWriter)
    OUT/manifest.json         the finished shards, their checksums, what made them (below)
    OUT/shards/NNNNN.npy      embeddings of shard NNNNN: (rows, dim) float16 or float32, l2-normalised
    OUT/shards/NNNNN.parquet  one record per embedding (below)

**Shards are ranges of the input.** The input is a sequence of images (a dataset spec's order); its
position in that sequence is the image's *global row*. Shard ``i`` covers the global rows
``[i * shard_size, min((i + 1) * shard_size, total))``. An image that cannot be decoded
(``--skip-bad-images``) has no embedding: its shard then holds fewer ``rows`` than ``inputs`` and the
manifest lists it under ``skipped``. Because a shard's place and content depend only on its index, shards
can be written in any order, by any number of processes (a Ray actor per shard) and redone one by one.

**The Parquet table** (pyarrow), one record per row of the ``.npy``, in the same order:

=========  ========  ======================================================================
column     type      meaning
=========  ========  ======================================================================
row        int64     global row of the image (its position in the input)
offset     int32     position of the row in this shard's ``.npy`` (0 .. rows - 1)
id         string    the image's id: a path (relative to an ImageFolder root, inside a tar as
                     ``TAR::KEY``, or as listed) or the row of an array dataset
label      int64     class index, -1 when unlabelled
width      int32     width of the decoded image before resizing (pixels)
height     int32     height of the decoded image before resizing (pixels)
=========  ========  ======================================================================

**manifest.json** (rewritten atomically after each finished shard)::

    {"format": "simsiam-kit-embedding-shards", "version": 1,
     "dim": D, "dtype": "float16" | "float32", "shard_size": S,
     "fingerprint": {...},          # what made the shards (model sha256, data, preprocessing); --resume
                                    # continues only where it matches, key for key
     "total": N | null,             # number of input images, when known
     "complete": false | true,      # every shard of [0, total) is listed
     "shards": [                    # sorted by index
       {"index": i, "name": "NNNNN", "first_row": i * S, "inputs": n_in, "rows": n_out,
        "npy": {"file": "shards/NNNNN.npy", "bytes": B, "sha256": H},
        "parquet": {"file": "shards/NNNNN.parquet", "bytes": B, "sha256": H},
        "skipped": [{"row": r, "id": "...", "error": "..."}]}
     ],
     "extra": {...}}                # free-form facts of the writer (classes, timing)

**Cost of the manifest.** It is rewritten whole (and fsynced) after every shard, so a run of ``S`` shards
writes ``O(S^2)`` manifest bytes (about 0.5 KB per entry): choose the shard size so that a run has at most
a few thousand shards (``--shard-size 100000`` for 100 million images).

**Atomicity.** A shard is written as two temp files (``shards/.NNNNN.npy.XXXXXXXX.tmp``), each fsynced
and renamed into place, and only then recorded in the manifest (itself replaced atomically). A file
that is not in the manifest is not a finished shard, whatever its name; a listed file whose size or
sha256 disagrees with the manifest is corrupt. Readers trust only the manifest, and
:func:`iter_shards` checks every file against it (``verify=True``) before using it.

**One writer.** :class:`ShardWriter` takes an exclusive ``flock`` on ``OUT/.lock`` for its lifetime (the lock
of a run directory, :class:`simsiam_kit.utils.dirlock.DirLock`: a symlink, hard link or device planted there
is refused); a second writer on the directory gets a :class:`UserError`. The kernel drops the lock when the
process dies, so a SIGKILLed run never leaves a stale lock. Forked children (DataLoader workers) close their
inherited copy at fork.

**Memory.** :class:`ShardWriter` holds at most one shard: the rows handed to
:meth:`ShardWriter.write_shard` and their encoded ``.npy`` + Parquet bytes while they are written
(about ``2 x rows x dim x itemsize`` plus the table), and the manifest (under 1 KB per finished shard,
without its ``skipped`` list). :func:`iter_shards` holds one shard at a time.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from simsiam_kit.errors import UserError
from simsiam_kit.utils.dirlock import DirLock
from simsiam_kit.utils.io import (
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    remove_stale_temp_files,
)

FORMAT = "simsiam-kit-embedding-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
DTYPES = ("float16", "float32")
#: the Parquet columns, in order, with their Arrow types (as strings, so pyarrow loads lazily)
COLUMNS = {"row": "int64", "offset": "int32", "id": "string", "label": "int64", "width": "int32", "height": "int32"}
MAX_SHARDS = 100_000  # NNNNN: five digits


def shard_name(index: int) -> str:
    if not 0 <= int(index) < MAX_SHARDS:
        raise ValueError(f"shard index {index} outside 0..{MAX_SHARDS - 1}")
    return f"{int(index):05d}"


def num_shards(total: int, shard_size: int) -> int:
    return -(-int(total) // int(shard_size))


def shard_range(index: int, shard_size: int, total: Optional[int] = None) -> tuple[int, int]:
    """Global rows ``[start, stop)`` covered by shard ``index``."""
    start = index * shard_size
    stop = start + shard_size
    return start, stop if total is None else min(stop, total)


@dataclass
class ShardInfo:
    """One finished shard as the manifest records it."""

    index: int
    inputs: int
    rows: int
    first_row: int
    npy: dict
    parquet: dict
    skipped: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return shard_name(self.index)

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "first_row": self.first_row,
            "inputs": self.inputs,
            "rows": self.rows,
            "npy": self.npy,
            "parquet": self.parquet,
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, d: dict, source: str) -> "ShardInfo":
        try:
            info = cls(
                index=int(d["index"]),
                inputs=int(d["inputs"]),
                rows=int(d["rows"]),
                first_row=int(d["first_row"]),
                npy=dict(d["npy"]),
                parquet=dict(d["parquet"]),
                skipped=list(d.get("skipped", [])),
            )
            for f in (info.npy, info.parquet):
                str(f["file"]), int(f["bytes"]), str(f["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source}: malformed shard entry {str(d)[:120]} ({type(e).__name__}: {e})") from None
        if not (0 <= info.rows <= info.inputs and 0 <= info.index < MAX_SHARDS):
            raise UserError(f"{source}: shard {info.index} has {info.rows} rows for {info.inputs} inputs")
        return info


# ----------------------------------------------------------------------------------- the lock
def shard_lock(root: Union[str, Path], what: str = "embedding run") -> DirLock:
    """The one-writer lock of an embedding directory (:class:`simsiam_kit.utils.dirlock.DirLock`): a second
    ``what`` is refused while it is held."""
    return DirLock(root, f"another {what} is writing to this directory", "an embedding directory", "writer")


# ----------------------------------------------------------------------------------- encoding
def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def _table(columns: dict, rows: int):
    import pyarrow as pa

    missing = [c for c in COLUMNS if c not in columns and c != "offset"]
    if missing:
        raise ValueError(f"shard table lacks columns {missing}")
    arrays = []
    for name, typ in COLUMNS.items():
        values = np.arange(rows, dtype=np.int32) if name == "offset" else columns[name]
        if name == "id":
            values = [str(v) for v in values]
        arr = pa.array(values, type=getattr(pa, typ)())
        if len(arr) != rows:
            raise ValueError(f"shard column '{name}' has {len(arr)} values for {rows} rows")
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, names=list(COLUMNS))


def _parquet_bytes(table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_shard_files(
    directory: Union[str, Path],
    index: int,
    embeddings: np.ndarray,
    columns: dict,
    inputs: int,
    dtype: str = "float32",
    skipped: Sequence[dict] = (),
    shard_size: Optional[int] = None,
) -> ShardInfo:
    """Write shard ``index`` (two files, each atomically) and return its manifest entry; the manifest
    itself is the writer's (:meth:`ShardWriter.add`). Safe to call from any process (a Ray actor): it
    takes no lock and touches no file but the shard's own.

    ``columns``: ``row``, ``id``, ``label``, ``width``, ``height`` (one value per embedding; ``offset`` is
    added). ``inputs``: images of the input this shard covers, including the skipped ones."""
    if dtype not in DTYPES:
        raise UserError(f"unknown embedding dtype '{dtype}' (available: {', '.join(DTYPES)})")
    z = np.asarray(embeddings)
    if z.ndim != 2:
        raise ValueError(f"embeddings must be (rows, dim), got shape {z.shape}")
    rows = len(z)
    rows_col = np.asarray(columns["row"], dtype=np.int64)
    first_row = index * shard_size if shard_size else (int(rows_col[0]) if rows else 0)
    d = Path(directory) / SHARDS_DIR
    name = shard_name(index)
    out = {}
    for ext, data in (
        ("npy", _npy_bytes(z.astype(dtype, copy=False))),
        ("parquet", _parquet_bytes(_table(columns, rows))),
    ):
        path = d / f"{name}.{ext}"
        atomic_write_bytes(path, data)
        out[ext] = {
            "file": f"{SHARDS_DIR}/{name}.{ext}",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        del data
    return ShardInfo(
        index=index,
        inputs=int(inputs),
        rows=rows,
        first_row=int(first_row),
        npy=out["npy"],
        parquet=out["parquet"],
        skipped=list(skipped),
    )


# ----------------------------------------------------------------------------------- reading
def read_manifest(directory: Union[str, Path]) -> Optional[dict]:
    """The manifest of ``directory`` (checked for its format and keys), or None when there is none."""
    from simsiam_kit.retrieval.files import read_json

    d = Path(directory)
    p = d / MANIFEST_NAME
    if not p.is_file():
        return None
    m = read_json(p, dict)
    if m.get("format") != FORMAT:
        raise UserError(f"{p}: not an embedding-shards manifest (format {str(m.get('format'))[:60]!r})")
    if m.get("version") != VERSION:
        raise UserError(f"{p}: manifest version {m.get('version')!r}; this simsiam-kit reads version {VERSION}")
    for key, kind in (("dim", int), ("dtype", str), ("shard_size", int), ("shards", list), ("fingerprint", dict)):
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise UserError(f"{p}: key '{key}' must be {kind.__name__}, got {str(m.get(key))[:60]!r}")
    if m["dtype"] not in DTYPES or m["dim"] < 1 or m["shard_size"] < 1:
        raise UserError(f"{p}: dim {m['dim']}, dtype {m['dtype']!r}, shard_size {m['shard_size']} are not valid")
    m["shards"] = [ShardInfo.from_json(s, str(p)) for s in m["shards"]]
    return m


def check_shard(directory: Union[str, Path], info: ShardInfo, dim: int, checksum: bool = True) -> Optional[str]:
    """None when both files of ``info`` are as the manifest records them, else what is wrong (one line)."""
    d = Path(directory)
    for f in (info.npy, info.parquet):
        p = d / f["file"]
        if p.is_symlink() or not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != f["bytes"]:
            return f"{p} holds {size} bytes, the manifest says {f['bytes']}"
        if checksum and file_sha256(p) != f["sha256"]:
            return f"{p} does not match its sha256 in the manifest"
    return None


def load_shard(directory: Union[str, Path], info: ShardInfo, dim: int, verify: bool = True):
    """``(embeddings, table)`` of one shard; with ``verify`` the files are checked against the manifest first
    (a :class:`UserError` naming the file otherwise)."""
    import pyarrow.parquet as pq

    from simsiam_kit.retrieval.files import load_npy

    d = Path(directory)
    if verify:
        bad = check_shard(d, info, dim)
        if bad:
            raise UserError(f"corrupt shard {info.name}: {bad}; rerun `simsiam-kit embed --resume` to redo it")
    z = load_npy(d / info.npy["file"], "f", 2, (info.rows, dim))
    try:
        table = pq.read_table(d / info.parquet["file"])
    except Exception as e:
        raise UserError(f"{d / info.parquet['file']}: not a readable Parquet file ({str(e)[:200]})") from None
    if table.num_rows != info.rows or table.column_names != list(COLUMNS):
        raise UserError(f"{d / info.parquet['file']}: expected {info.rows} rows of columns {list(COLUMNS)}")
    return z, table


def iter_shards(directory: Union[str, Path], verify: bool = True) -> Iterator[tuple[ShardInfo, np.ndarray, Any]]:
    """``(info, embeddings, table)`` of each finished shard, in index order, one shard in memory at a time."""
    m = read_manifest(directory)
    if m is None:
        raise UserError(f"{directory}: no {MANIFEST_NAME} (a directory written by `simsiam-kit embed`)")
    for info in sorted(m["shards"], key=lambda s: s.index):
        z, table = load_shard(directory, info, m["dim"], verify=verify)
        yield info, z, table


# ----------------------------------------------------------------------------------- writing
class ShardWriter:
    """The one writer of a shard directory: lock, resume, one shard at a time, the manifest.

    ::

        w = ShardWriter(out, dim=512, dtype="float16", shard_size=10_000,
                        fingerprint={"model_sha256": ..., "data": ...}, resume=True, total=n)
        for i in w.todo():                       # the shard indices still missing, in order
            w.write_shard(i, z, columns, inputs=n_in, skipped=[...])
        w.close()                                # marks the manifest complete when nothing is missing

    ``lock``: the directory's :func:`shard_lock` when the caller took it already (``embed`` takes it before
    timing its runtime), released by the writer from then on.
    ``resume=False`` on a directory that already holds a manifest is a :class:`UserError` (nothing is
    overwritten by accident; ``clear(directory)``, called once the lock is held, removes an earlier run's files
    first: ``embed --overwrite``); ``resume=True`` keeps every listed shard whose files match the manifest
    (sha256), drops the others (``dropped`` says which and why) and refuses a different ``fingerprint``,
    ``dim``, ``dtype`` or ``shard_size``."""

    def __init__(
        self,
        directory: Union[str, Path],
        dim: int,
        dtype: str = "float32",
        shard_size: int = 10_000,
        fingerprint: Optional[dict] = None,
        resume: bool = False,
        total: Optional[int] = None,
        extra: Optional[dict] = None,
        lock: Optional[DirLock] = None,
        clear: Optional[Callable[[Path], None]] = None,
    ):
        if dtype not in DTYPES:
            raise UserError(f"unknown embedding dtype '{dtype}' (available: {', '.join(DTYPES)})")
        if shard_size < 1:
            raise UserError(f"--shard-size must be >= 1 (got {shard_size})")
        if total is not None and num_shards(total, shard_size) > MAX_SHARDS:
            raise UserError(
                f"{total} images in shards of {shard_size} make more than {MAX_SHARDS} shards; raise --shard-size"
            )
        self.root = Path(directory).expanduser()
        self.dim, self.dtype, self.shard_size, self.total = int(dim), dtype, int(shard_size), total
        self.fingerprint = dict(fingerprint or {})
        self.extra = dict(extra or {})
        self.dropped: list[str] = []
        self._lock = (lock or shard_lock(self.root)).acquire()  # ``lock``: the directory's, taken by the caller
        try:
            if clear is not None:  # embed --overwrite: the earlier run's files go, now that no one else writes
                clear(self.root)
            remove_stale_temp_files(self.root)
            remove_stale_temp_files(self.root / SHARDS_DIR)
            self.shards: dict[int, ShardInfo] = {}
            self._open(resume)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, resume: bool) -> None:
        m = read_manifest(self.root)
        if m is None:
            self._write_manifest()
            return
        where = self.root / MANIFEST_NAME
        if not resume:
            raise UserError(
                f"{self.root} already holds embedding shards ({where}); pass --resume to continue that run, "
                "or choose another output directory"
            )
        theirs = (m["dim"], m["dtype"], m["shard_size"])
        if theirs != (self.dim, self.dtype, self.shard_size):
            raise UserError(
                f"{where}: written with dim {theirs[0]}, dtype {theirs[1]}, shard size {theirs[2]}; this run has "
                f"dim {self.dim}, dtype {self.dtype}, shard size {self.shard_size}: --resume needs the same settings"
            )
        diff = [
            k
            for k in set(m["fingerprint"]) | set(self.fingerprint)
            if m["fingerprint"].get(k) != self.fingerprint.get(k)
        ]
        if diff:
            k = sorted(diff)[0]
            raise UserError(
                f"{where}: --resume with a different {k} ({str(m['fingerprint'].get(k))[:60]!r} there, "
                f"{str(self.fingerprint.get(k))[:60]!r} now); use the same model and data, or another directory"
            )
        self.extra = {**m.get("extra", {}), **self.extra}
        for info in m["shards"]:
            bad = check_shard(self.root, info, self.dim)
            if (
                bad is None
                and self.total is not None
                and info.inputs != len(range(*shard_range(info.index, self.shard_size, self.total)))
            ):
                bad = f"shard {info.name} covers {info.inputs} inputs, not those of this run"
            if bad:
                self.dropped.append(bad)
            else:
                self.shards[info.index] = info
        self._write_manifest()

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def todo(self) -> list[int]:
        """Indices of the shards still to write (needs ``total``)."""
        if self.total is None:
            raise ValueError("todo() needs the total number of inputs")
        return [i for i in range(num_shards(self.total, self.shard_size)) if i not in self.shards]

    @property
    def complete(self) -> bool:
        return self.total is not None and not self.todo()

    def write_shard(
        self, index: int, embeddings: np.ndarray, columns: dict, inputs: int, skipped: Sequence[dict] = ()
    ) -> ShardInfo:
        """Write shard ``index`` atomically and record it in the manifest."""
        if np.asarray(embeddings).shape[1:] != (self.dim,):
            raise ValueError(f"shard {index}: embeddings of shape {np.shape(embeddings)}, expected (rows, {self.dim})")
        info = write_shard_files(
            self.root, index, embeddings, columns, inputs, self.dtype, skipped, shard_size=self.shard_size
        )
        return self.add(info)

    def add(self, info: ShardInfo) -> ShardInfo:
        """Record a shard written by :func:`write_shard_files` (by this or another process) after checking
        its files against ``info``."""
        if not self._lock.locked:
            raise RuntimeError("the shard writer is closed")
        bad = check_shard(self.root, info, self.dim)
        if bad:
            raise UserError(f"shard {info.name} cannot be recorded: {bad}")
        self.shards[info.index] = info
        self._write_manifest()
        return info

    def _write_manifest(self) -> None:
        atomic_write_json(
            self.manifest_path,
            {
                "format": FORMAT,
                "version": VERSION,
                "dim": self.dim,
                "dtype": self.dtype,
                "shard_size": self.shard_size,
                "fingerprint": self.fingerprint,
                "total": self.total,
                "complete": self.complete,
                "shards": [self.shards[i].to_json() for i in sorted(self.shards)],
                "extra": self.extra,
            },
        )

    def flush(self, extra: Optional[dict] = None) -> None:
        """Rewrite the manifest now (with ``extra`` merged in), keeping the lock."""
        if extra:
            self.extra.update(extra)
        self._write_manifest()

    def close(self, extra: Optional[dict] = None) -> None:
        """Write the final manifest (``complete`` when no shard is missing) and release the lock."""
        if extra:
            self.extra.update(extra)
        if self._lock.locked:
            self._write_manifest()
            self._lock.release()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._lock.locked:
            self._lock.release()  # an error: the manifest already lists every finished shard
