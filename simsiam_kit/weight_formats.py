"""Other projects' weights files, recognised by what they hold (never by their name).

:func:`extract_backbone` turns a loaded file (a ``torch.load`` result with ``weights_only=True``, or a
safetensors file's tensors and metadata) into the backbone's state dict under torchvision's names, plus
what it read, in words. Containers and key layouts recognised:

============================  ==========================================================  ==============
container                     what tells it                                               encoder read
============================  ==========================================================  ==============
official SimSiam              ``{'epoch','arch','state_dict','optimizer'}``, keys           ``encoder``
                              ``module.encoder.*`` (projector in ``encoder.fc.*``),
                              ``module.predictor.*``
MoCo v2 (official)            same container, ``module.encoder_q.*`` / ``encoder_k.*``      ``encoder_q``
MoCo v3 (official)            same container, ``module.base_encoder.*`` /                   ``base_encoder``
                              ``momentum_encoder.*``
DINO ``checkpoint.pth``       ``teacher`` and ``student`` state dicts (``backbone.*``,      ``teacher``
                              ``head.*``), as DINO's own ``eval_knn.py`` /
                              ``eval_linear.py`` read (``--checkpoint_key teacher``)
Lightning ``.ckpt``           ``state_dict`` + ``pytorch-lightning_version`` /             ``backbone``
                              ``global_step``; solo-learn (``classifier.*`` beside
                              ``backbone.*``; its CIFAR stem pads ``conv1`` by 2),
                              lightly (``projection_head.*``, ``online_classifier.*``;
                              ``backbone.<n>.*`` of an ``nn.Sequential`` of a ResNet's
                              children also read)
mmpretrain                    ``{'meta','state_dict'}``, ``backbone.*``                    ``backbone``
timm / torchvision / others   a plain state dict (``fc.*`` is the classifier), or one      the only one
                              under a ``model`` / ``state_dict`` key, any prefix
safetensors                   the file's header (timm's and the Hugging Face hub's format)  the only one
============================  ==========================================================  ==============

A file holding several ResNets (a teacher and a student, a query and a key encoder) is read for the one
its project evaluates; ``FILE#NAME`` picks another (``#student``, ``#encoder_k``, ``#momentum_encoder``).
Projectors, predictors, heads, queues and the other copies are left out and every key not loaded is
listed (:attr:`Extracted.unused`), as detectron2's converter lists what it does not convert. Half
precision tensors are widened to float32. A layout the project cannot build exactly (a deep stem,
squeeze-and-excitation, grouped convolutions) is refused with its name by the backbone entries
(:func:`simsiam_kit.models.backbones.check_buildable`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from simsiam_kit.errors import UserError

#: names of the copy each project evaluates, in order of preference, when a file holds several
PREFERRED_COPIES = ("encoder", "encoder_q", "base_encoder", "backbone", "teacher", "model", "")
#: what the other top-level groups of a file are, in words (key prefixes without ``module.``)
GROUP_WORDS = {
    "predictor": "predictor",
    "prediction_head": "predictor",
    "projector": "projector",
    "projection_head": "projector",
    "fc": "projector",
    "head": "head",
    "classifier": "online classifier",
    "online_classifier": "online classifier",
    "encoder_k": "momentum encoder",
    "momentum_encoder": "momentum encoder",
    "momentum_backbone": "momentum encoder",
    "backbone_momentum": "momentum encoder",
    "momentum_projector": "momentum projector",
    "projection_head_momentum": "momentum projector",
    "queue": "queue",
    "queue_ptr": "queue",
    "neck": "neck",
}
# an nn.Sequential(*list(resnet.children())[:-1]) (lightly's examples): child index -> torchvision name
SEQUENTIAL_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


@dataclass
class Extracted:
    """A backbone state dict (torchvision names, float32 or the file's dtype widened) and what was read."""

    state_dict: dict
    format: str  # the container, in words ("official SimSiam checkpoint")
    kind: str  # short name for results files
    meta: dict = field(default_factory=dict)  # arch, stem, epoch, image_size, mean, std the file records
    config: dict = field(default_factory=dict)  # a simsiam-kit checkpoint's run config
    copy: str = ""  # the encoder copy read ("encoder", "teacher", ...)
    copies: tuple = ()  # every copy the file holds (what ``FILE#NAME`` may name)
    unused: list = field(default_factory=list)  # every key not loaded, as the file names it
    left_out: list = field(default_factory=list)  # what those keys are, in words
    prefix: str = ""  # the prefix of the encoder read (its keys not loaded are its fc: grouped as such)

    def summary(self) -> str:
        """One line: ``official SimSiam checkpoint (epoch 100, resnet50): 320 encoder tensors, projector
        and predictor left out``."""
        details = []
        if self.meta.get("epoch") is not None:
            details.append(f"epoch {self.meta['epoch']}")
        if self.meta.get("arch"):
            details.append(str(self.meta["arch"]))
        head = self.format + (f" ({', '.join(details)})" if details else "")
        what = "backbone tensors" if self.copy in ("", "backbone", "model") else f"{self.copy} tensors"
        if self.copy in ("teacher", "student"):
            what = f"{self.copy} backbone tensors"
        line = f"{head}: {len(self.state_dict)} {what}"
        if self.left_out:
            words = self.left_out
            line += ", " + (", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]) + " left out"
        others = [c for c in self.copies if c != self.copy]
        if others:
            line += f" (also in the file: {', '.join('#' + c for c in others)})"
        return line

    def unused_report(self, limit: int = 8) -> Optional[str]:
        """The keys not loaded, grouped by their prefix, or None."""
        if not self.unused:
            return None
        groups: dict[str, int] = {}
        for k in self.unused:
            if self.prefix and k.startswith(self.prefix + "fc."):
                groups[self.prefix + "fc.*"] = groups.get(self.prefix + "fc.*", 0) + 1
                continue
            parts = k.split(".")
            g = ".".join(parts[:2]) if parts[0] == "module" and len(parts) > 2 else parts[0]
            if g == k:
                groups[k] = groups.get(k, 0) + 1
            else:
                groups[g + ".*"] = groups.get(g + ".*", 0) + 1
        items = [f"{g} ({n})" for g, n in groups.items()]
        more = f", ... ({len(items) - limit} more groups)" if len(items) > limit else ""
        return f"  not loaded ({len(self.unused)} keys): " + ", ".join(items[:limit]) + more


# ----------------------------------------------------------------------------------------------
# safetensors


def is_safetensors(head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object."""
    if len(head) < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= 100_000_000 and head[8:9] == b"{"


def read_safetensors(data: bytes, source: str) -> tuple[dict, dict]:
    """(tensors, ``__metadata__``) of safetensors bytes; one-line errors."""
    try:
        from safetensors.torch import load
    except ImportError:  # a runtime dependency; only a broken install lacks it
        raise UserError(f"{source}: a safetensors file, but the 'safetensors' package is not installed") from None
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        tensors = load(data)
    except Exception as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{source}: not a readable safetensors file ({msg[:200]})") from None
    meta = header.get("__metadata__") or {}
    return tensors, meta if isinstance(meta, dict) else {}


def metadata_from_safetensors(meta: dict) -> dict:
    """arch, stem, epoch, image_size, mean, std from a safetensors ``__metadata__`` (strings), as written by
    ``export torchvision|timm``; values that do not parse are left out."""
    out = {}
    for k in ("arch", "stem"):
        if isinstance(meta.get(k), str):
            out[k] = meta[k]
    for k in ("epoch", "image_size"):
        try:
            out[k] = int(meta[k])
        except (KeyError, TypeError, ValueError):
            pass
    for k in ("mean", "std"):
        try:
            v = json.loads(meta[k])
            if isinstance(v, list) and len(v) == 3:
                out[k] = tuple(float(x) for x in v)
        except (KeyError, TypeError, ValueError):
            pass
    return out


# ----------------------------------------------------------------------------------------------
# containers


def _is_state_dict(obj) -> bool:
    import torch

    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) for k in obj)
        and all(torch.is_tensor(v) for v in obj.values())
    )


def _tensors_of(obj) -> dict:
    """The tensor entries of a mapping (a state dict with a stray non-tensor value still reads)."""
    import torch

    return {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}


def _container(obj: dict) -> tuple[str, str, dict, dict]:
    """(format in words, kind, {copy name: state dict} of top-level copies, meta) of a loaded dict."""
    meta = {}
    epoch = obj.get("epoch")
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        meta["epoch"] = epoch
    if isinstance(obj.get("arch"), str):
        meta["arch"] = obj["arch"]
    if isinstance(obj.get("teacher"), dict) and isinstance(obj.get("student"), dict):
        return "DINO checkpoint", "dino", {"teacher": obj["teacher"], "student": obj["student"]}, meta
    sd = obj.get("state_dict")
    if isinstance(sd, dict):
        if "pytorch-lightning_version" in obj or "global_step" in obj:
            keys = list(sd)
            if any(k.startswith("classifier.") for k in keys) and any(k.startswith("backbone.") for k in keys):
                name, kind = "solo-learn checkpoint", "solo-learn"
            elif any(k.startswith(("projection_head.", "online_classifier.", "prediction_head.")) for k in keys):
                name, kind = "lightly checkpoint", "lightly"
            else:
                name, kind = "Lightning checkpoint", "lightning"
            return name, kind, {"": sd}, meta
        if isinstance(obj.get("meta"), dict):
            mm = obj["meta"]
            if "epoch" not in meta and isinstance(mm.get("epoch"), int):
                meta["epoch"] = mm["epoch"]
            return "mmpretrain checkpoint", "mmpretrain", {"": sd}, meta
        keys = [k[len("module.") :] if k.startswith("module.") else k for k in sd]
        if any(k.startswith("encoder.") for k in keys) and any(k.startswith("predictor.") for k in keys):
            return "official SimSiam checkpoint", "simsiam-official", {"": sd}, meta
        if any(k.startswith("encoder_q.") for k in keys):
            return "MoCo v2 checkpoint", "mocov2", {"": sd}, meta
        if any(k.startswith("base_encoder.") for k in keys):
            return "MoCo v3 checkpoint", "mocov3", {"": sd}, meta
        return "checkpoint ('state_dict')", "state_dict", {"": sd}, meta
    if isinstance(obj.get("model"), dict) and "format" not in obj:
        return "checkpoint ('model')", "state_dict", {"": obj["model"]}, meta
    if _is_state_dict(obj):
        return "state dict", "state_dict", {"": obj}, meta
    return "", "", {}, meta


def _resnet_prefixes(sd: dict) -> dict[str, str]:
    """{prefix: layout} of every ResNet in a state dict: "torchvision" where ``P + 'conv1.*'`` (or a deep
    stem, ``P + 'stem.*'``) and ``P + 'layer1.*'`` exist, "sequential" for an ``nn.Sequential`` of a
    ResNet's children (``P + '0.weight'`` and ``P + '4.0.conv1.weight'``)."""
    found = {}
    stage_prefixes = set()
    for k in sd:
        i = k.find("layer1.")
        if i >= 0 and (i == 0 or k[i - 1] == "."):
            stage_prefixes.add(k[:i])
    for p in sorted(stage_prefixes, key=len):
        if any(p + s in sd for s in ("conv1.weight", "conv1.0.weight", "stem.0.conv.weight")):
            found[p] = "torchvision"
    for k in sd:
        tail = "4.0.conv1.weight"
        if k.endswith(tail) and (k == tail or k[: -len(tail)].endswith(".")):
            p = k[: -len(tail)]
            if p + "0.weight" in sd:
                found.setdefault(p, "sequential")
    return found


def _copy_name(prefix: str) -> str:
    p = prefix[:-1] if prefix.endswith(".") else prefix
    for lead in ("module.", "_orig_mod."):
        while p.startswith(lead):
            p = p[len(lead) :]
    return p[len("module") :] if p == "module" else p


def _group_word(key: str, fmt_kind: str) -> str:
    parts = [p for p in key.split(".") if p not in ("module", "_orig_mod")]
    first = parts[0] if parts else key
    if len(parts) > 1 and parts[1] == "fc" and first in ("encoder", "encoder_q", "base_encoder"):
        return "projector"
    if first == "fc" and fmt_kind in ("state_dict", "mmpretrain", "lightning"):
        return "classifier (fc)"
    return GROUP_WORDS.get(first, first)


def extract_foreign(obj, source: str, select: Optional[str] = None, file_meta: Optional[dict] = None) -> Extracted:
    """The backbone of a file from another project (see the module docstring); a :class:`UserError` naming
    what the file holds when it holds no ResNet, several without a rule to choose, or ``select`` absent."""
    import torch

    if not isinstance(obj, dict):
        raise UserError(f"{source}: holds a {type(obj).__name__}, not a state dict or a checkpoint dictionary")
    fmt, kind, top, meta = _container(obj)
    meta.update(file_meta or {})
    if not top:
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise UserError(
            f"{source}: not a simsiam-kit file nor another checkpoint this toolkit reads (top-level keys {keys}); "
            "expected a state dict, "
            "a simsiam-kit file, or an official SimSiam/MoCo, DINO, Lightning (lightly, solo-learn), "
            "mmpretrain or timm/torchvision checkpoint"
        )
    # every ResNet in the file, by copy name
    candidates: dict[str, tuple[str, str, str]] = {}  # copy -> (top-level copy, prefix, layout)
    for top_name, sd in top.items():
        if not isinstance(sd, dict):
            continue
        sd = _tensors_of(sd)
        for p, layout in _resnet_prefixes(sd).items():
            inner = _copy_name(p)
            if top_name and inner in ("backbone", ""):
                name = top_name  # DINO: teacher.backbone -> "teacher"
            elif top_name:
                name = f"{top_name}.{inner}"
            else:
                name = inner
            candidates.setdefault(name, (top_name, p, layout))
    copies = tuple(candidates)
    if not candidates:
        some = next((sd for sd in top.values() if isinstance(sd, dict) and sd), {})
        prefixes = sorted({k.split(".")[0] for k in some})[:8]
        raise UserError(
            f"{source}: {fmt} without ResNet weights (no '<prefix>conv1.weight' with 'layer1.0.*' beside it; "
            f"top-level key groups: {', '.join(prefixes) or 'none'})"
        )
    if select is not None:
        if select not in candidates:
            raise UserError(
                f"{source}#{select}: the file holds no encoder named '{select}' "
                f"(it holds: {', '.join(repr(c) for c in copies)})"
            )
        chosen = select
    elif len(candidates) == 1:
        chosen = copies[0]
    else:
        preferred = [c for c in PREFERRED_COPIES if c in candidates]
        if not preferred:
            raise UserError(
                f"{source}: {fmt} with several ResNets ({', '.join(repr(c) for c in copies)}); "
                f"name one: {source}#{copies[0]}"
            )
        chosen = preferred[0]
    top_name, prefix, layout = candidates[chosen]
    sd = _tensors_of(top[top_name])
    backbone, unused = {}, []
    for k, v in sd.items():
        if not k.startswith(prefix):
            unused.append(f"{top_name}.{k}" if top_name else k)
            continue
        rest = k[len(prefix) :]
        if layout == "sequential":
            head, _, tail = rest.partition(".")
            if head not in SEQUENTIAL_CHILDREN:
                unused.append(k)
                continue
            rest = f"{SEQUENTIAL_CHILDREN[head]}.{tail}"
        if rest.startswith("fc."):  # a classifier, or SimSiam's / MoCo's projector
            unused.append(f"{top_name}.{k}" if top_name else k)
            continue
        backbone[rest] = v.float() if v.is_floating_point() and v.dtype != torch.float64 else v
    for other in top:
        if other != top_name:
            unused.extend(f"{other}.{k}" for k in _tensors_of(top[other]) if isinstance(top[other], dict))
    words = []
    for k in unused:
        first, _, rest = k.partition(".")
        if top_name and first in top:  # DINO: "teacher.head.*" is the teacher's head, "student.*" the student
            w = _group_word(rest, kind) if first == top_name else first
        else:
            w = _group_word(k, kind)
        if w not in words:
            words.append(w)
    if kind == "solo-learn" and "stem" not in meta:
        w = backbone.get("conv1.weight")
        if w is not None and tuple(w.shape[-2:]) == (3, 3):
            meta["stem"] = "solo-cifar"  # solo-learn pads its CIFAR conv1 by 2 (solo/methods/base.py)
    return Extracted(
        backbone,
        fmt,
        kind,
        meta=meta,
        copy=chosen,
        copies=copies if len(copies) > 1 else (),
        unused=unused,
        left_out=words,
        prefix=(f"{top_name}." if top_name else "") + prefix,
    )


def file_label(path: Path, select: Optional[str]) -> str:
    return f"{path}#{select}" if select else str(path)
