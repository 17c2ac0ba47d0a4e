"""The ResNet entries: torchvision ResNets with the ImageNet stem or the CIFAR stem.

The classifier ``fc`` is replaced by ``nn.Identity`` so the backbone returns pooled features and its
state dict keys are exactly torchvision's (minus ``fc.*``), which keeps conversion to detectron2 and
loading into ``torchvision.models.resnetXX`` prefix-free.

``stem="cifar"`` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv and no max-pool (the CIFAR variant
of ResNet used in the paper's appendix D). ``zero_init_residual=True`` zero-initialises the last BN of
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
    "cifar": Stem("cifar", kernel=3, stride=1, maxpool=False, default_image_size=32),
    "imagenet": Stem("imagenet", kernel=7, stride=2, maxpool=True, default_image_size=224),
}


def build_resnet(entry: BackboneEntry, stem: Stem, zero_init_residual: bool = True, norm_layer=None):
    import torch.nn as nn
    from torchvision import models as tvm

    kw = {"norm_layer": norm_layer} if norm_layer is not None else {}
    net = getattr(tvm, entry.name)(weights=None, zero_init_residual=zero_init_residual, **kw)
    if (stem.kernel, stem.stride, stem.maxpool) != (7, 2, True):  # torchvision's own stem otherwise
        net.conv1 = nn.Conv2d(3, 64, kernel_size=stem.kernel, stride=stem.stride, padding=stem.kernel // 2, bias=False)
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
    """The stem whose first conv has the kernel of ``conv1.weight``."""
    w = state_dict.get("conv1.weight")
    if w is None:
        raise UserError("state dict has no 'conv1.weight': not a ResNet backbone")
    k = tuple(w.shape[-2:])
    for s in stems.values():
        if k == (s.kernel, s.kernel):
            return s.name
    known = ", ".join(f"{s.name}: {s.kernel}x{s.kernel}" for s in stems.values())
    raise UserError(f"conv1.weight is {k[0]}x{k[1]}: no ResNet stem has that first conv ({known})")


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
