"""Load a backbone from whatever a user points at.

``--weights`` accepts: a pretraining run directory (uses ``backbone.pt``, else
``checkpoints/last.pt``), a full simsiam-kit checkpoint, a ``backbone.pt``, a plain torchvision-style
ResNet state dict (needs ``arch``), or ``random`` (a randomly initialised backbone, needs ``arch`` and
``stem``) for the random-init baseline.

Every load goes through :func:`load_state_dict_checked`, which refuses weights holding NaN or inf.
In a run directory, ``backbone.pt`` is used unless the checkpoint is newer (a run killed between the
two writes by a version that wrote the checkpoint first); pretraining now writes the backbone first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from simsiam_kit.engine.checkpoint import (
    BACKBONE_FORMAT,
    CHECKPOINT_FORMAT,
    clean_state_dict,
    describe_nonfinite,
    load_file,
    nonfinite_tensors,
)
from simsiam_kit.errors import UserError
from simsiam_kit.models.backbones import build_backbone, infer_arch, infer_stem


@dataclass
class LoadedBackbone:
    model: torch.nn.Module
    arch: str
    stem: str
    source: str
    image_size: Optional[int] = None
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    meta: dict = field(default_factory=dict)


def _extract_backbone_sd(obj, path: Path) -> tuple[dict, dict]:
    """Return (backbone state dict, metadata) from a loaded file."""
    if isinstance(obj, dict) and obj.get("format") == BACKBONE_FORMAT:
        return clean_state_dict(obj["state_dict"]), {k: v for k, v in obj.items() if k != "state_dict"}
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        sd = clean_state_dict(obj["model"])
        bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        if not bb:
            raise UserError(f"{path}: checkpoint holds no backbone weights")
        cfg = obj.get("config", {})
        meta = {"arch": cfg.get("model", {}).get("arch"), "stem": cfg.get("model", {}).get("stem"),
                "image_size": cfg.get("data", {}).get("image_size"),
                "mean": tuple(cfg.get("data", {}).get("mean", ())) or None,
                "std": tuple(cfg.get("data", {}).get("std", ())) or None}
        return bb, meta
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj) and all(
        torch.is_tensor(v) for v in obj.values()
    ):
        sd = clean_state_dict(obj)
        if any(k.startswith("backbone.") for k in sd):  # a SimSiam model state dict
            sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        if "conv1.weight" not in sd:
            raise UserError(f"{path}: not a simsiam-kit file and not a ResNet state dict (no 'conv1.weight')")
        return sd, {}
    raise UserError(f"{path}: not a simsiam-kit checkpoint or backbone file")


def _saved_epoch(path: Path) -> Optional[int]:
    """The ``epoch`` a simsiam-kit backbone/checkpoint file records, read through a memory map (the
    tensors are not read); None when it cannot be told."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(obj["epoch"]) if isinstance(obj, dict) and "epoch" in obj else None
    except Exception:
        return None


def resolve_weights_path(spec: str) -> Path:
    p = Path(spec).expanduser()
    if p.is_dir():
        backbone, ckpt = p / "backbone.pt", p / "checkpoints" / "last.pt"
        if backbone.is_file() and ckpt.is_file():
            b, c = _saved_epoch(backbone), _saved_epoch(ckpt)
            if b is not None and c is not None and b < c:
                return ckpt  # backbone.pt is older than the checkpoint: never present stale weights
        for cand in (backbone, ckpt):
            if cand.is_file():
                return cand
        raise UserError(f"{p}: no backbone.pt or checkpoints/last.pt in this run directory")
    if not p.exists():
        raise UserError(f"weights not found: {p} (expected a run directory, a .pt file, or 'random')")
    return p


def load_backbone(spec: str, arch: Optional[str] = None, stem: Optional[str] = None, seed: int = 0) -> LoadedBackbone:
    if spec == "random":
        if arch is None:
            raise UserError("--weights random needs --arch (for example --arch resnet18)")
        torch.manual_seed(seed)
        m = build_backbone(arch, stem or "imagenet")
        return LoadedBackbone(m, arch, stem or "imagenet", "random")
    path = resolve_weights_path(spec)
    sd, meta = _extract_backbone_sd(load_file(path), path)
    found_arch = meta.get("arch") or infer_arch(sd)
    found_stem = meta.get("stem") or infer_stem(sd)
    if arch is not None and arch != found_arch:
        raise UserError(f"{path}: weights are {found_arch}, but --arch {arch} was requested")
    if stem is not None and stem != found_stem:
        raise UserError(f"{path}: weights have the {found_stem} stem, but stem '{stem}' was requested")
    model = build_backbone(found_arch, found_stem)
    load_state_dict_checked(model, sd, str(path))
    return LoadedBackbone(
        model, found_arch, found_stem, str(path), image_size=meta.get("image_size"),
        mean=tuple(meta.get("mean") or (0.485, 0.456, 0.406)), std=tuple(meta.get("std") or (0.229, 0.224, 0.225)),
        meta=meta,
    )


def check_finite(sd: dict, source: str) -> None:
    """Refuse weights that hold NaN or inf (a diverged run's): one line naming the file."""
    bad, total = nonfinite_tensors(sd)
    if bad:
        raise UserError(f"{source}: non-finite weights, {describe_nonfinite(bad, total)}; "
                        "these weights come from a diverged run and cannot be used")


def load_state_dict_checked(model: torch.nn.Module, sd: dict, source: str) -> None:
    """Strict load with an error that lists missing, unexpected and mis-shaped keys; finite weights only."""
    check_finite(sd, source)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if shape:
            parts.append(f"shape mismatch: {', '.join(shape[:5])}{' ...' if len(shape) > 5 else ''}")
        if missing:
            parts.append(f"missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
        if unexpected:
            more = " ..." if len(unexpected) > 5 else ""
            parts.append(f"unexpected: {', '.join(unexpected[:5])}{more} ({len(unexpected)})")
        raise UserError(f"{source}: weights do not fit the architecture; " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
