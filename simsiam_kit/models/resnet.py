"""The ResNet entries: torchvision ResNets with the ImageNet stem or the CIFAR stem.

The classifier ``fc`` is replaced by ``nn.Identity`` so the backbone returns pooled features and its
state dict keys are exactly torchvision's (minus ``fc.*``), which keeps conversion to detectron2 and
loading into ``torchvision.models.resnetXX`` prefix-free.

``stem="cifar"`` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv (padding 1) and no max-pool (the CIFAR
variant of ResNet used in the paper's appendix D). ``stem="solo-cifar"`` is solo-learn's CIFAR stem: the
same tensors, but its ``conv1`` pads by 2 (``solo/methods/base.py``), so a 32 px image reaches the first
stage at 34 px; weights trained with it are built with it exactly, never with padding 1.
``zero_init_residual=True`` zero-initialises the last BN of
each residual branch, as the official SimSiam code does.

A state dict's layout is read from its keys and shapes: the blocks per stage (``layer{1-4}.{i}.*``),
the block type (a Bottleneck has ``conv3``) and the width of the last stage (its last BN).
"""

from __future__ import annotations

from typing import Mapping, Optional

from simsiam_kit.errors import UserError
from simsiam_kit.models.backbones import BackboneEntry, Stem

STAGES = ("layer1", "layer2", "layer3", "layer4")
STEM_MODULES = ("conv1", "bn1")
RESNET_STEMS = {
    "cifar": Stem(
        "cifar", kernel=3, stride=1, maxpool=False, default_image_size=32, origin="conv1 3x3/1, padding 1, no max-pool"
    ),
    "imagenet": Stem("imagenet", kernel=7, stride=2, maxpool=True, default_image_size=224, origin="torchvision"),
    "solo-cifar": Stem(
        "solo-cifar",
        kernel=3,
        stride=1,
        maxpool=False,
        default_image_size=32,
        padding=2,
        origin="solo-learn's CIFAR stem (conv1 3x3/1, padding 2, no max-pool)",
        inferable=False,  # same shapes as "cifar": known from a solo-learn checkpoint or a file's metadata
    ),
}


def build_resnet(entry: BackboneEntry, stem: Stem, zero_init_residual: bool = True, norm_layer=None):
    import torch.nn as nn
    from torchvision import models as tvm

    kw = {"norm_layer": norm_layer} if norm_layer is not None else {}
    net = getattr(tvm, entry.name)(weights=None, zero_init_residual=zero_init_residual, **kw)
    if (stem.kernel, stem.stride, stem.conv_padding, stem.maxpool) != (7, 2, 3, True):  # else torchvision's own
        net.conv1 = nn.Conv2d(3, 64, kernel_size=stem.kernel, stride=stem.stride, padding=stem.conv_padding, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        if not stem.maxpool:
            net.maxpool = nn.Identity()
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    net.arch, net.stem = entry.name, stem.name
    return net


def _block_index(key: str, stage: str) -> Optional[int]:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == stage and parts[1].isdigit():
        return int(parts[1])
    return None


def read_resnet_layout(state_dict: Mapping) -> tuple:
    """(block type, blocks per stage, width of the last stage) of a torchvision-style ResNet state dict;
    0 blocks and width 0 where the keys are absent (a state dict of something else matches no entry)."""
    blocks = []
    for stage in STAGES:
        idx = {i for i in (_block_index(k, stage) for k in state_dict) if i is not None}
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = any(k.startswith("layer1.") and k.endswith("conv3.weight") for k in state_dict)
    last_bn = state_dict.get(f"layer4.{blocks[-1] - 1}.bn{3 if bottleneck else 2}.weight")
    width = int(last_bn.shape[0]) if last_bn is not None and len(last_bn.shape) == 1 else 0
    return ("bottleneck" if bottleneck else "basic", tuple(blocks), width)


def describe_resnet_layout(layout: tuple) -> str:
    block, blocks, width = layout
    return f"ResNet blocks per stage {list(blocks)}, {block} blocks, last stage {width} channels"


def read_resnet_stem(state_dict: Mapping, stems: Mapping[str, Stem]) -> str:
    """The stem whose first conv has the kernel of ``conv1.weight`` (stems that shapes cannot tell apart,
    such as solo-learn's padding-2 CIFAR stem, are never guessed: their weights say so by name)."""
    w = state_dict.get("conv1.weight")
    if w is None:
        raise UserError("state dict has no 'conv1.weight': not a ResNet backbone")
    k = tuple(w.shape[-2:])
    for s in stems.values():
        if s.inferable and k == (s.kernel, s.kernel):
            return s.name
    known = ", ".join(f"{s.name}: {s.kernel}x{s.kernel}" for s in stems.values() if s.inferable)
    raise UserError(f"conv1.weight is {k[0]}x{k[1]}: no ResNet stem has that first conv ({known})")


def check_resnet_keys(state_dict: Mapping, source: str) -> None:
    """What :func:`read_resnet_layout` and :func:`read_resnet_stem` read must be well formed: stage keys
    ``layerN.<block index>.…`` and a 4-D ``conv1.weight``; else one line naming the key."""
    for k in state_dict:
        if k.startswith("layer"):
            parts = k.split(".")
            if len(parts) < 3 or not parts[1].isdigit() or not parts[1].isascii():
                raise UserError(f"{source}: key '{k}' is not a ResNet stage key (layerN.<block index>.<name>)")
    w = state_dict.get("conv1.weight")
    if w is not None and len(w.shape) != 4:
        raise UserError(f"{source}: 'conv1.weight' has shape {tuple(w.shape)}, not a convolution (4-D)")


def read_resnet_variant(state_dict: Mapping) -> Optional[str]:
    """The name of a ResNet variant this family cannot build exactly, read from a state dict's keys and
    shapes, or None for a plain torchvision layout (timm's ``resnet50.a1_in1k`` is one)."""
    keys = list(state_dict)
    if "conv1.0.weight" in state_dict or any(k.startswith("stem.") for k in keys):
        return "a deep stem (three 3x3 convs: timm's resnet*c / resnet*d, mmpretrain's ResNetV1c / ResNetV1d)"
    if any(".se." in k or ".se_module." in k or ".attn." in k for k in keys):
        return "squeeze-and-excitation / attention blocks (SE-ResNet, ECA, ...)"
    for k in keys:
        w = state_dict[k]
        if k.endswith("downsample.1.weight") and len(getattr(w, "shape", ())) == 4:
            return "an average-pool shortcut (ResNet-D: 'downsample.1' is a conv)"
    c1, c2 = state_dict.get("layer1.0.conv1.weight"), state_dict.get("layer1.0.conv2.weight")
    if c1 is not None and c2 is not None and len(c1.shape) == 4 and len(c2.shape) == 4:
        if c2.shape[1] != c2.shape[0]:  # a plain block's 3x3 conv sees all its input channels
            return f"grouped 3x3 convolutions (ResNeXt: layer1.0.conv2 sees {c2.shape[1]} of {c1.shape[0]} channels)"
        if "layer1.0.conv3.weight" in state_dict and c1.shape[0] != 64:
            return f"wide bottlenecks (Wide ResNet: layer1 width {c1.shape[0]}, torchvision's ResNets use 64)"
    return None


def _entry(name: str, block: str, blocks: tuple, widths: tuple, depth: int) -> BackboneEntry:
    return BackboneEntry(
        name=name,
        builder=build_resnet,
        feature_dim=widths[-1],
        stages=tuple(zip(STAGES, widths)),
        stem_modules=STEM_MODULES,
        stems=RESNET_STEMS,
        layout=(block, blocks, widths[-1]),
        read_layout=read_resnet_layout,
        read_stem=read_resnet_stem,
        describe_layout=describe_resnet_layout,
        read_variant=read_resnet_variant,
        check_keys=check_resnet_keys,
        detectron2_depth=depth,
    )


BASIC_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_WIDTHS = (256, 512, 1024, 2048)
RESNETS = {
    "resnet18": _entry("resnet18", "basic", (2, 2, 2, 2), BASIC_WIDTHS, 18),
    "resnet34": _entry("resnet34", "basic", (3, 4, 6, 3), BASIC_WIDTHS, 34),
    "resnet50": _entry("resnet50", "bottleneck", (3, 4, 6, 3), BOTTLENECK_WIDTHS, 50),
    "resnet101": _entry("resnet101", "bottleneck", (3, 4, 23, 3), BOTTLENECK_WIDTHS, 101),
}
