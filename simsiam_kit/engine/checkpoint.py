"""Checkpoints: atomic writes, unwrapped state dicts, ``weights_only=True`` loads, finite weights only.

:func:`nonfinite_tensors` is the one finiteness test: the pretraining save path refuses to write a state
that fails it, and ``simsiam_kit.weights`` refuses to load one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from simsiam_kit.errors import UserError
from simsiam_kit.utils.io import atomic_torch_save

CHECKPOINT_FORMAT = "simsiam-kit-checkpoint"
BACKBONE_FORMAT = "simsiam-kit-backbone"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", None)  # DDP's wrapped module
    return inner if isinstance(inner, torch.nn.Module) else model


def clean_state_dict(sd: dict) -> dict:
    """Drop DDP / torch.compile prefixes, move to CPU."""
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "_orig_mod."):
            if k.startswith(pre):
                k = k[len(pre) :]
        out[k] = v.detach().cpu() if torch.is_tensor(v) else v
    return out


def get_rng_state(aug_gen: torch.Generator | None = None) -> dict:
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True: (name, keys, pos, has_gauss, cached)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": list(_py_state_to_list(random.getstate())),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if aug_gen is not None:
        state["aug"] = aug_gen.get_state()
    return state


def _py_state_to_list(st):
    version, internal, gauss = st
    return [version, list(internal), gauss]


def set_rng_state(state: dict, aug_gen: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if aug_gen is not None and "aug" in state:
        if state["aug"].numel() == aug_gen.get_state().numel():
            aug_gen.set_state(state["aug"])
        else:  # saved by a generator on another device type (a CPU run resumed on a GPU, or back)
            import warnings

            warnings.warn(
                "the augmentation RNG state was saved on another device type; the resumed run "
                "continues with a freshly seeded augmentation stream (not bit-identical)",
                stacklevel=2,
            )


def _floating_tensors(obj, prefix: str = ""):
    if torch.is_tensor(obj):
        if obj.is_floating_point() or obj.is_complex():
            yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _floating_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _floating_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def nonfinite_tensors(state: Any) -> tuple[list[str], int]:
    """Names of the floating tensors in a (nested) state that hold a NaN or an infinity, and how many
    floating tensors there are. One reduction per tensor where it lives, one host sync in all."""
    named = list(_floating_tensors(state))
    if not named:
        return [], 0
    flags = [torch.isfinite(t).all() for _, t in named]
    by_device: dict = {}
    for (name, _), f in zip(named, flags):
        by_device.setdefault(f.device, []).append((name, f))
    bad = []
    for items in by_device.values():
        ok = torch.stack([f for _, f in items]).cpu()
        bad += [name for (name, _), good in zip(items, ok.tolist()) if not good]
    return bad, len(named)


def describe_nonfinite(bad: list[str], total: int) -> str:
    return f"{len(bad)} of {total} floating tensors hold nan/inf (first: {', '.join(bad[:3])})"


def save_checkpoint(path: Path, **payload: Any) -> None:
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "version": 2, **payload}, path)


class ModelState:
    """A model as a checkpointable: saved unwrapped (no DDP / compile prefixes), on the CPU."""

    def __init__(self, model: torch.nn.Module):
        self.model = unwrap(model)

    def state_dict(self) -> dict:
        return clean_state_dict(self.model.state_dict())

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd)


class RNGState:
    """Every process's RNG streams (torch, numpy, python, CUDA, the augmentation generator) as a
    checkpointable. ``state_dict`` is collective under DDP (each rank's state is gathered to all)."""

    def __init__(self, aug_gen: torch.Generator | None = None):
        self.aug_gen = aug_gen

    def state_dict(self):
        from simsiam_kit.utils import dist

        state = get_rng_state(self.aug_gen)
        if not dist.is_dist():
            return state
        import torch.distributed as tdist

        states: list[Optional[dict]] = [None] * dist.get_world_size()
        tdist.all_gather_object(states, state)
        return states

    def load_state_dict(self, state) -> None:
        from simsiam_kit.utils import dist

        set_rng_state(state[dist.get_rank()] if isinstance(state, list) else state, self.aug_gen)


class Checkpointables:
    """Named objects with ``state_dict``/``load_state_dict`` saved and restored in one call (detectron2's
    ``Checkpointer(model, **checkpointables)``), so resuming is never written out per object. ``None``
    entries (a GradScaler that does not exist in bf16) are left out."""

    def __init__(self, **objects: Any):
        self.objects = {k: v for k, v in objects.items() if v is not None}

    def state_dict(self) -> dict:
        return {k: v.state_dict() for k, v in self.objects.items()}

    def load_state_dict(self, payload: dict, source: str = "checkpoint") -> None:
        for name, obj in self.objects.items():
            if payload.get(name) is None:
                raise UserError(f"{source}: the checkpoint has no '{name}' state")
            try:
                obj.load_state_dict(payload[name])
            except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
                # e.g. a model shape changed since the checkpoint was written (torch lists every key)
                first = str(e).strip().splitlines()
                detail = " ".join(line.strip() for line in first[:3])
                raise UserError(
                    f"{source}: the saved '{name}' state does not fit this run ({type(e).__name__}: {detail[:300]})"
                ) from None


def backbone_payload(backbone: torch.nn.Module, arch: str, stem: str, extra: dict | None = None) -> dict:
    return {
        "format": BACKBONE_FORMAT,
        "version": 1,
        "arch": arch,
        "stem": stem,
        "feature_dim": int(getattr(unwrap(backbone), "feature_dim", 0)),
        "state_dict": clean_state_dict(unwrap(backbone).state_dict()),
        **(extra or {}),
    }


def save_backbone(path: Path, backbone: torch.nn.Module, arch: str, stem: str, extra: dict | None = None) -> None:
    atomic_torch_save(backbone_payload(backbone, arch, stem, extra), path)


def load_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors for missing/corrupt/foreign files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load {path}: not a readable PyTorch checkpoint ({msg[:200]})") from None
