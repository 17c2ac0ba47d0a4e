"""Backbones: torchvision ResNets with the ImageNet stem or the CIFAR stem.

The classifier ``fc`` is replaced by ``nn.Identity`` so the backbone returns pooled features and its
state dict keys are exactly torchvision's (minus ``fc.*``), which keeps conversion to detectron2 and
loading into ``torchvision.models.resnetXX`` prefix-free.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
from torchvision import models as tvm

from simsiam_kit.errors import UserError

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
}

STEMS = ("cifar", "imagenet")


def build_backbone(arch: str = "resnet18", stem: str = "imagenet", zero_init_residual: bool = True) -> nn.Module:
    """Build a randomly initialised ResNet backbone returning (N, feature_dim) pooled features.

    ``stem="cifar"`` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv and no max-pool (the CIFAR
    variant of ResNet used in the paper's appendix D). ``zero_init_residual=True`` zero-initialises the
    last BN of each residual branch, as the official SimSiam code does.
    """
    if arch not in BACKBONES:
        raise UserError(f"unknown backbone '{arch}' (available: {', '.join(BACKBONES)})")
    if stem not in STEMS:
        raise UserError(f"unknown stem '{stem}' (available: {', '.join(STEMS)})")
    net = BACKBONES[arch](weights=None, zero_init_residual=zero_init_residual)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    net.arch, net.stem = arch, stem
    return net


def infer_stem(state_dict) -> str:
    """'cifar' when conv1 is 3x3, 'imagenet' when 7x7."""
    w = state_dict.get("conv1.weight")
    if w is None:
        raise UserError("state dict has no 'conv1.weight': not a ResNet backbone")
    return "cifar" if w.shape[-1] == 3 else "imagenet"


def infer_arch(state_dict) -> str:
    """Guess the ResNet depth from the number of blocks per stage and the block type."""
    blocks = []
    for layer in range(1, 5):
        idx = {int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{layer}.")}
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = any(k.endswith("conv3.weight") for k in state_dict if k.startswith("layer1."))
    table = {
        (False, (2, 2, 2, 2)): "resnet18",
        (False, (3, 4, 6, 3)): "resnet34",
        (True, (3, 4, 6, 3)): "resnet50",
        (True, (3, 4, 23, 3)): "resnet101",
    }
    arch = table.get((bottleneck, tuple(blocks)))
    if arch is None:
        raise UserError(f"cannot infer the ResNet architecture (blocks per stage {blocks}, bottleneck={bottleneck})")
    return arch
