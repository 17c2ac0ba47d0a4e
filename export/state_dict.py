"""Export a backbone as a plain state dict for torchvision or timm (``.safetensors`` or ``.pth``), with a
JSON sidecar saying how to load it and how to preprocess images for it.

The tensors are the backbone's, under torchvision's names without ``fc.*``: they load with
``strict=True`` into ``torchvision.models.resnetXX()`` whose ``fc`` is ``nn.Identity()``, and into
``timm.create_model("resnetXX", num_classes=0)`` (timm's plain ResNets share torchvision's key layout).
A CIFAR stem (3x3/1 conv, no max-pool; solo-learn's pads by 2) is not one either library builds by
name: the sidecar's ``load`` recipe swaps ``conv1`` and ``maxpool`` before loading.

The sidecar (``<output stem>.json``) records arch, stem, image size, mean/std, the evaluation resize rule
(:func:`simsiam_kit.image_settings.eval_preprocessing`), the recipe, and the source weights (file,
sha256, epoch, run); a ``.safetensors`` file also carries arch, stem, image size, mean/std and epoch in
its ``__metadata__``, which this toolkit's loader reads back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from simsiam_kit.errors import UserError
from simsiam_kit.export.encoder import load_encoder

TARGETS = ("torchvision", "timm")
SUFFIXES = (".safetensors", ".pth", ".pt")


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.stem + ".json")


def load_recipe(target: str, arch: str, stem, file_name: str) -> str:
    """Python that loads the exported file with ``strict=True`` (``stem``: the backbone entry's Stem)."""
    read = (
        f'from safetensors.torch import load_file; sd = load_file("{file_name}")'
        if file_name.endswith(".safetensors")
        else f'sd = torch.load("{file_name}", weights_only=True)'
    )
    if target == "timm":
        build = f'import timm, torch; m = timm.create_model("{arch}", num_classes=0)'
    else:
        build = f"import torch, torchvision; m = torchvision.models.{arch}(); m.fc = torch.nn.Identity()"
    swap = ""
    if (stem.kernel, stem.stride, stem.conv_padding, stem.maxpool) != (7, 2, 3, True):
        swap = f"; m.conv1 = torch.nn.Conv2d(3, 64, {stem.kernel}, {stem.stride}, {stem.conv_padding}, bias=False)" + (
            "" if stem.maxpool else "; m.maxpool = torch.nn.Identity()"
        )
    return f"{build}{swap}; {read}; m.load_state_dict(sd, strict=True); m.eval()"


def export_state_dict(
    weights: str,
    output: Path,
    target: str = "torchvision",
    image_size: Optional[int] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Write the backbone of ``weights`` to ``output`` (``.safetensors`` or ``.pth``) and its sidecar;
    return the sidecar's content."""

    from simsiam_kit.image_settings import eval_preprocessing
    from simsiam_kit.models.backbones import get_backbone_entry
    from simsiam_kit.utils.io import atomic_torch_save, atomic_write_bytes, atomic_write_json

    if target not in TARGETS:
        raise UserError(f"unknown export target '{target}' (available: {', '.join(TARGETS)})")
    output = Path(output).expanduser()
    if output.suffix.lower() not in SUFFIXES:
        raise UserError(f"--output {output}: expected a {' or '.join(SUFFIXES)} file name")
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; give a file name such as {output / 'resnet.safetensors'}")
    enc = load_encoder(weights, image_size=image_size, log=log)
    stem = get_backbone_entry(enc.arch).stem(enc.stem)
    sd = {k: v.detach().cpu().contiguous() for k, v in enc.backbone.state_dict().items()}
    r = enc.record
    source = {"weights": str(weights), "file": enc.source}
    source.update({k: r[k] for k in ("sha256", "epoch", "run_dir", "format", "copy") if r.get(k) is not None})
    pre = eval_preprocessing(enc.image_size)
    meta = {
        "format": f"simsiam-kit {target} state dict",
        "arch": enc.arch,
        "stem": enc.stem,
        "image_size": str(enc.image_size),
        "mean": json.dumps(list(enc.mean)),
        "std": json.dumps(list(enc.std)),
    }
    if r.get("epoch") is not None:
        meta["epoch"] = str(r["epoch"])
    if output.suffix.lower() == ".safetensors":
        from safetensors.torch import save

        atomic_write_bytes(output, save(sd, metadata=meta))
    else:
        atomic_torch_save(sd, output)
    sidecar = {
        "format": f"{target} state dict",
        "file": output.name,
        "tensors": len(sd),
        "arch": enc.arch,
        "stem": enc.stem,
        "stem_detail": {
            "conv1": f"{stem.kernel}x{stem.kernel}, stride {stem.stride}, padding {stem.conv_padding}",
            "maxpool": stem.maxpool,
            "origin": stem.origin,
        },
        "fc": "removed: the file holds the backbone only; load it into a model whose fc is nn.Identity() "
        "(torchvision) or built with num_classes=0 (timm), as 'load' does",
        "feature_dim": enc.embedding_dim,
        "image_size": enc.image_size,
        "mean": list(enc.mean),
        "std": list(enc.std),
        "preprocessing": pre,
        "load": load_recipe(target, enc.arch, stem, output.name),
        "source": source,
    }
    atomic_write_json(sidecar_path(output), sidecar)
    log(f"wrote {output} ({len(sd)} tensors, {enc.arch}, {enc.stem} stem) and {sidecar_path(output).name}")
    log(f"load: {sidecar['load']}")
    return sidecar
