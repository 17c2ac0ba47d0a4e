"""Shared pieces of the evaluations: backbone and dataset loading with clear errors, image
settings resolved from the weights' metadata, output directories, small text tables."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from simsiam_kit.data import load_dataset
from simsiam_kit.data.datasets import ImageDataset
from simsiam_kit.config import DEFAULT_DATA_ROOT
from simsiam_kit.errors import UserError
from simsiam_kit.weights import LoadedBackbone, load_backbone, load_state_dict_checked

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_eval_backbone(weights: str, arch: Optional[str] = None, stem: Optional[str] = None,
                       seed: int = 0) -> LoadedBackbone:
    """:func:`simsiam_kit.weights.load_backbone`, but an ``--arch``/``--stem`` that does not match the
    file is reported with the mismatched keys (the weights are tried on the requested network)."""
    if weights == "random":
        return load_backbone("random", arch, stem, seed=seed)
    found = load_backbone(weights)  # arch/stem from the file's metadata or inferred from its keys
    if (arch is not None and arch != found.arch) or (stem is not None and stem != found.stem):
        from simsiam_kit.models import build_backbone

        want = build_backbone(arch or found.arch, stem or found.stem)
        try:
            load_state_dict_checked(want, found.model.state_dict(), found.source)
        except UserError as e:
            raise UserError(f"{e} (the file holds a {found.arch} with the {found.stem} stem; requested "
                            f"{arch or found.arch} with the {stem or found.stem} stem)") from None
    return found


@dataclass(frozen=True)
class ImageSettings:
    image_size: Optional[int]  # None: in-memory images are used at their own size
    mean: tuple
    std: tuple
    source: str  # where the values came from: "weights", "options", "defaults"


def resolve_image_settings(loaded: LoadedBackbone, ds: ImageDataset, image_size: Optional[int] = None,
                           mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> ImageSettings:
    """Image size / normalisation: options override the weights' metadata, which overrides defaults
    (in-memory images at their own size, 224 px for image files, ImageNet mean/std)."""
    meta = loaded.meta or {}
    src = "weights" if meta.get("image_size") or meta.get("mean") else "defaults"
    size = image_size or meta.get("image_size")
    if size is None:
        size = int(ds.images.shape[1]) if ds.in_memory else 224
    m = tuple(float(v) for v in (mean or meta.get("mean") or IMAGENET_MEAN))
    s = tuple(float(v) for v in (std or meta.get("std") or IMAGENET_STD))
    for name, v in (("mean", m), ("std", s)):
        if len(v) != 3:
            raise UserError(f"--{name} needs 3 comma-separated values, got {len(v)}")
    if any(v <= 0 for v in s):
        raise UserError(f"--std values must be positive, got {s}")
    if image_size or mean or std:
        src = "options"
    return ImageSettings(int(size), m, s, src)


def parse_floats(text: Optional[str], name: str) -> Optional[tuple]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--{name}: expected comma-separated numbers such as 0.485,0.456,0.406, got '{text}'") from None


def load_labelled(spec: str, role: str, root: str = DEFAULT_DATA_ROOT, download: bool = False,
                  skip_bad_images: bool = False) -> ImageDataset:
    ds = load_dataset(spec, root, download, skip_bad_images)
    if len(ds) == 0:
        raise UserError(f"{role} dataset '{spec}' is empty")
    if not ds.has_labels:
        raise UserError(f"{role} dataset '{spec}' has unlabelled images (label -1); evaluation needs labels")
    return ds


def check_same_classes(train: ImageDataset, test: ImageDataset, train_spec: str, test_spec: str) -> list:
    """The two sets must share one class list; returns it (names, or indices as strings)."""
    if train.classes is not None and test.classes is not None:
        if list(train.classes) != list(test.classes):
            only_train = [c for c in train.classes if c not in test.classes]
            only_test = [c for c in test.classes if c not in train.classes]
            detail = []
            if only_train:
                detail.append(f"only in train: {', '.join(map(str, only_train[:5]))}")
            if only_test:
                detail.append(f"only in test: {', '.join(map(str, only_test[:5]))}")
            if not detail:
                detail.append("same names in a different order")
            raise UserError(f"train '{train_spec}' and test '{test_spec}' have different class lists "
                            f"({len(train.classes)} vs {len(test.classes)} classes; {'; '.join(detail)})")
        return list(train.classes)
    n_train = train.num_classes
    extra = sorted(set(np.unique(test.labels).tolist()) - set(np.unique(train.labels).tolist()))
    if extra:
        raise UserError(f"test '{test_spec}' has labels not present in train '{train_spec}': "
                        f"{', '.join(map(str, extra[:10]))}")
    names = train.classes or test.classes
    return list(names) if names is not None else [str(i) for i in range(max(n_train, test.num_classes))]


def default_output(weights: str, kind: str) -> Path:
    p = Path(weights).expanduser()
    if weights != "random" and p.is_dir():
        return p / "eval" / kind
    return Path("runs") / f"eval-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in header]] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
