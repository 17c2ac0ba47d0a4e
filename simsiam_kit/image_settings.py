"""Image size and normalisation of an evaluation or an export, resolved in one place.

Each value is taken from the first source that has it (timm's ``resolve_data_config`` rule):

1. the command's option (``--image-size``, ``--mean``, ``--std``);
2. the weights' metadata (``backbone.pt`` stores the pretraining image size, mean and std);
3. the run's config (a checkpoint's embedded config, or ``RUN/config.yaml`` for ``--weights random
   --like RUN``);
4. the default: in-memory images (``.npz``, CIFAR, the demo) keep their own size, image files are
   brought to 32 px for the CIFAR stem and 224 px for the ImageNet stem; ImageNet mean/std.

``eval knn``, ``eval linear`` and ``export onnx`` call :func:`resolve_image_settings`; the result records
where each value came from (``sources``), and results files store it.

How an image of another size is brought to ``image_size`` at evaluation time is one rule too,
:func:`eval_resize_crop` (described by :func:`eval_preprocessing` for metadata and sidecars): an image
already ``image_size`` x ``image_size`` is used as it is; any other has its shorter side resized to
``round(image_size / 0.875)`` with PIL's bilinear filter (antialiased: it averages over the whole
footprint when shrinking; ``torchvision.transforms.v2.functional.resize(..., antialias=True)`` on a PIL
image is the same call) and is centre-cropped to ``image_size`` (torchvision's ``CenterCrop`` offsets).
``eval knn``/``eval linear`` features (in-memory and file datasets alike), ``embed`` and the ONNX
runtime all use it. OpenCV's or torch's non-antialiased bilinear resize gives other pixels, so the
metadata names the filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from simsiam_kit.config import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from simsiam_kit.errors import UserError
from simsiam_kit.models.backbones import STEMS

SOURCES = ("option", "weights", "config", "default")  # the precedence, first wins
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096
STEM_IMAGE_SIZE = {s.name: s.default_image_size for s in STEMS.values()}  # image files without a stored size


@dataclass(frozen=True)
class ImageSettings:
    image_size: int
    mean: tuple
    std: tuple
    sources: Mapping[str, str]  # value name -> one of SOURCES

    @property
    def source(self) -> str:
        """One word for all three values when they share a source, else ``size:weights,mean:option,...``."""
        kinds = set(self.sources.values())
        if len(kinds) == 1:
            return kinds.pop()
        return ",".join(f"{k}:{v}" for k, v in self.sources.items())

    def describe(self) -> str:
        return f"{self.image_size} px, mean {list(self.mean)}, std {list(self.std)} (from {self.source})"


def default_image_size(stem: Optional[str], data_size: Optional[int] = None) -> int:
    """In-memory images keep their own size (``data_size``); otherwise the stem's usual input size."""
    if data_size:
        return int(data_size)
    return STEM_IMAGE_SIZE.get(stem or "imagenet", STEM_IMAGE_SIZE["imagenet"])


def _pick(name: str, layers: Sequence[tuple[str, Optional[Mapping]]]):
    for source, values in layers:
        v = (values or {}).get(name)
        if v is not None and not (isinstance(v, (tuple, list)) and len(v) == 0):
            return v, source
    return None, None


def resolve_image_settings(
    option: Optional[Mapping] = None,
    weights: Optional[Mapping] = None,
    config: Optional[Mapping] = None,
    stem: Optional[str] = None,
    data_size: Optional[int] = None,
) -> ImageSettings:
    """``option``, ``weights``, ``config``: mappings with any of ``image_size``, ``mean``, ``std`` (None or
    missing = not given). ``stem`` and ``data_size`` (the side of in-memory images) choose the default size.

    Every value is checked whatever its source: 3 means and 3 positive stds, a size in 8..4096 px; a
    :class:`UserError` names the value and where it came from."""
    layers = [
        ("option", option),
        ("weights", weights),
        ("config", config),
        ("default", {"image_size": default_image_size(stem, data_size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
    ]
    values, sources = {}, {}
    for name in ("image_size", "mean", "std"):
        values[name], sources[name] = _pick(name, layers)
    where = {
        "option": "the command option",
        "weights": "the weights' metadata",
        "config": "the run's config",
        "default": "the default",
    }
    try:
        size = int(values["image_size"])
    except (TypeError, ValueError):
        raise UserError(
            f"image size {values['image_size']!r} from {where[sources['image_size']]} is not a whole number of pixels"
        ) from None
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise UserError(
            f"image size {size} from {where[sources['image_size']]}: expected {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels"
        )
    out = {}
    for name in ("mean", "std"):
        try:
            v = tuple(float(x) for x in values[name])
        except (TypeError, ValueError):
            raise UserError(f"image {name} {values[name]!r} from {where[sources[name]]}: expected 3 numbers") from None
        if len(v) != 3:
            raise UserError(f"image {name} from {where[sources[name]]} has {len(v)} values; expected 3 (R, G, B)")
        out[name] = v
    if any(not s > 0 for s in out["std"]):
        raise UserError(f"image std {list(out['std'])} from {where[sources['std']]}: every value must be positive")
    return ImageSettings(size, out["mean"], out["std"], dict(sources))


RESIZE_RULE = (
    "as is at image_size x image_size; otherwise shorter side to round(image_size / 0.875) with PIL "
    "bilinear (antialiased; = torchvision.transforms.v2.functional.resize(pil_image, short, "
    "InterpolationMode.BILINEAR, antialias=True)), then a centre crop of image_size (torchvision CenterCrop "
    "offsets: round((side - image_size) / 2))"
)


def eval_preprocessing(image_size: int) -> dict:
    """The evaluation-time resize rule for ``image_size``, as data (export metadata and sidecars)."""
    return {
        "rule": RESIZE_RULE,
        "resize_shorter_side_to": int(round(image_size / DEFAULT_CROP_PCT)),
        "crop_pct": DEFAULT_CROP_PCT,
        "interpolation": "bilinear",
        "antialias": True,
        "library": "PIL.Image.resize(..., Image.BILINEAR)",
        "center_crop": image_size,
        "input_scale": "pixels / 255, then (x - mean) / std, RGB",
    }


def eval_resize_crop(image, image_size: int):
    """One image (H, W, 3) uint8 array or PIL image -> (image_size, image_size, 3) uint8 array by the
    evaluation rule (module docstring): unchanged at image_size x image_size."""
    import numpy as np
    from PIL import Image

    a = np.asarray(image, dtype=np.uint8)
    h, w = a.shape[:2]
    if h == image_size and w == image_size:
        return a
    short = int(round(image_size / DEFAULT_CROP_PCT))
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    im = image if isinstance(image, Image.Image) else Image.fromarray(a)
    im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = int(round((nh - image_size) / 2.0)), int(round((nw - image_size) / 2.0))
    return np.asarray(im.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)
