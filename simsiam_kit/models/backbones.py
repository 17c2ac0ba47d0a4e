"""Backbones by name: one entry per architecture that builds the module and states its facts.

An entry (:class:`BackboneEntry`, timm ``_registry.py`` style; a dict is enough) says everything the
rest of the toolkit asks about an architecture, so no other module knows ResNets:

* ``build(stem, zero_init_residual, norm_layer)``: a randomly initialised module returning pooled
  ``(N, feature_dim)`` features, with ``feature_dim``, ``arch`` and ``stem`` attributes;
* ``feature_dim``: the width of those features;
* ``stages``: the feature stages a detector taps, as ``(module name, channels)`` from the stem up
  (torchvision's ``IntermediateLayerGetter`` names and FPN ``in_channels_list``, detectron2's res2..res5);
* ``stem_modules``: the modules before the first stage (trained with the stages, frozen with them);
* ``stems``: the input stems it can be built with (:class:`Stem`: conv kernel and stride, max-pool,
  default image size);
* ``matches(state_dict)``: whether a state dict has this entry's layout (:func:`infer_arch` asks every
  entry), and ``stem_of(state_dict)`` which stem it was built with (:func:`infer_stem`);
* ``check_keys(state_dict, source)``: the family's check that the keys its readers use are well formed
  (a hostile or damaged file is one line naming the key), and ``read_variant(state_dict)``: the name of a
  variant of the family it cannot build exactly; :func:`check_buildable` runs both, so a variant is
  refused by name, never approximated;
* ``detectron2_depth``: ``MODEL.RESNETS.DEPTH`` of the matching detectron2 backbone, or None.

Adding an architecture (a ViT, say) is one module with its builder and entries, and one line in
:data:`BACKBONES`. Nothing here imports torch at module level: config validation and the CLI's
up-front checks ask the entries for free; torch is loaded when a module is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from simsiam_kit.errors import UserError


@dataclass(frozen=True)
class Stem:
    """An input stem: the first conv (``kernel`` x ``kernel``, ``stride``, ``padding``) and whether a
    max-pool follows. Two stems with the same tensors but another padding are two stems: weights carry
    their stem's name (a file's metadata or its container's format) when the shapes cannot tell it."""

    name: str
    kernel: int
    stride: int
    maxpool: bool
    default_image_size: int  # the input side for image files when nothing else says (image_settings)
    padding: Optional[int] = None  # None: kernel // 2 ("same" for odd kernels)
    origin: str = ""  # whose stem it is, in words (for messages and export sidecars)
    inferable: bool = True  # recognised from a state dict's shapes alone (the first stem of its kernel)

    @property
    def conv_padding(self) -> int:
        return self.kernel // 2 if self.padding is None else self.padding

    def output_side(self, side: int) -> int:
        """The side of the first stage's input for a ``side`` x ``side`` image."""
        out = (side + 2 * self.conv_padding - self.kernel) // self.stride + 1
        return (out + 2 - 3) // 2 + 1 if self.maxpool else out  # max-pool 3x3/2, padding 1

    @property
    def reduction(self) -> int:
        """How much the stem shrinks the input before the first stage."""
        return self.stride * (2 if self.maxpool else 1)


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    builder: Callable[..., object]  # (entry, stem, zero_init_residual, norm_layer) -> nn.Module
    feature_dim: int
    stages: tuple[tuple[str, int], ...]  # (module name, output channels), stem side first
    stem_modules: tuple[str, ...]
    stems: Mapping[str, Stem]
    layout: tuple  # what matches() compares, e.g. ("bottleneck", (3, 4, 6, 3)) for a ResNet-50
    read_layout: Callable[[Mapping], tuple]  # state dict -> layout (the family's reader)
    read_stem: Callable[[Mapping, Mapping[str, Stem]], str]  # state dict, stems -> stem name
    describe_layout: Callable[[tuple], str] = repr  # a layout in words, for errors
    read_variant: Callable[[Mapping], Optional[str]] = lambda sd: None  # a variant it cannot build, by name
    check_keys: Callable[[Mapping, str], None] = lambda sd, source: None  # raises on malformed keys it reads
    detectron2_depth: Optional[int] = None

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.stages)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(c for _, c in self.stages)

    def stem(self, name: str) -> Stem:
        if name not in self.stems:
            raise UserError(f"unknown stem '{name}' for {self.name} (available: {', '.join(self.stems)})")
        return self.stems[name]

    def build(self, stem: str = "imagenet", zero_init_residual: bool = True, norm_layer=None):
        """A randomly initialised module (see the module docstring); ``norm_layer``: the 2-d norm class
        (default BatchNorm2d), e.g. a detector's FrozenBatchNorm2d."""
        return self.builder(self, self.stem(stem), zero_init_residual, norm_layer)

    def matches(self, state_dict: Mapping) -> bool:
        return self.read_layout(state_dict) == self.layout

    def stem_of(self, state_dict: Mapping) -> str:
        return self.read_stem(state_dict, self.stems)

    def feature_strides(self, stem: str) -> tuple[int, ...]:
        """Output stride of each stage with ``stem`` (each stage after the first halves the resolution)."""
        r = self.stem(stem).reduction
        return tuple(r * 2**i for i in range(len(self.stages)))


def _registry() -> dict[str, BackboneEntry]:
    from simsiam_kit.models.resnet import RESNETS

    return {**RESNETS}  # a new family: {**RESNETS, **VITS}


BACKBONES: dict[str, BackboneEntry] = _registry()
#: every stem some entry supports, by name
STEMS: dict[str, Stem] = {s.name: s for e in BACKBONES.values() for s in e.stems.values()}


def get_backbone_entry(arch: str) -> BackboneEntry:
    """The entry named ``arch``; an unknown name fails listing the known ones."""
    try:
        return BACKBONES[arch]
    except (KeyError, TypeError):
        raise UserError(f"unknown backbone '{arch}' (available: {', '.join(BACKBONES)})") from None


def build_backbone(arch: str = "resnet18", stem: str = "imagenet", zero_init_residual: bool = True, norm_layer=None):
    """Build a randomly initialised backbone returning (N, feature_dim) pooled features (the one factory)."""
    return get_backbone_entry(arch).build(stem, zero_init_residual, norm_layer)


def infer_arch(state_dict: Mapping) -> str:
    """The one entry whose layout the state dict has; a :class:`UserError` describing it otherwise."""
    found = [name for name, e in BACKBONES.items() if e.matches(state_dict)]
    if len(found) == 1:
        return found[0]
    families = {e.read_layout: e for e in BACKBONES.values()}
    seen = "; ".join(e.describe_layout(read(state_dict)) for read, e in families.items())
    what = f"matches {', '.join(found)}" if found else f"none of {', '.join(BACKBONES)}"
    raise UserError(f"cannot infer the backbone architecture ({seen}: {what})")


def check_buildable(state_dict: Mapping, source: str = "weights") -> None:
    """Before any entry reads a state dict: every family's check of the keys it reads (one line naming a
    malformed key), then refuse, by name, a variant of a family that no entry builds exactly (a deep stem,
    SE blocks, grouped convolutions): such weights are never loaded into an approximate network."""
    for check in {e.check_keys: None for e in BACKBONES.values()}:
        check(state_dict, source)
    for read in {e.read_variant: None for e in BACKBONES.values()}:
        variant = read(state_dict)
        if variant:
            raise UserError(
                f"{source}: the weights have {variant}; the backbones here are plain torchvision ResNets "
                f"({', '.join(BACKBONES)}) and another layout is never built approximately"
            )


def infer_stem(state_dict: Mapping, arch: Optional[str] = None) -> str:
    """The stem a state dict was built with, read by ``arch``'s entry (default: the inferred one; entries
    of one family share the reader, so any entry reads a stem its layout does not match)."""
    entry = get_backbone_entry(arch) if arch is not None else next(iter(BACKBONES.values()))
    if arch is None:
        entry = next((e for e in BACKBONES.values() if e.matches(state_dict)), entry)
    return entry.stem_of(state_dict)
