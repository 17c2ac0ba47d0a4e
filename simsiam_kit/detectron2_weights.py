"""Convert a simsiam-kit ResNet backbone into a Detectron2 checkpoint (``.pkl``).

Detectron2 reads a pickle ``{"model": {name: numpy array}, "__author__": str,
"matching_heuristics": True}``. With ``matching_heuristics`` each checkpoint key is matched to the
model key that ends with it on a ``.`` boundary (the longest such key wins), so ``res5.0.conv1.weight``
lands in ``backbone.res5...`` of an FPN model under ``backbone.bottom_up`` and in ``roi_heads.res5`` of
a C4 model. A key whose shape differs is skipped with only a warning, so this module checks names
itself, with an explicit key map (MoCo/SimSiam's detection converter) and a list of every key it
leaves unconverted, instead of dropping keys without a word.

Key map (torchvision ResNet -> detectron2 ResNet)::

    conv1.weight               -> stem.conv1.weight
    bn1.*                      -> stem.conv1.norm.*
    layer{N}.{b}.conv{K}.weight -> res{N+1}.{b}.conv{K}.weight
    layer{N}.{b}.bn{K}.*        -> res{N+1}.{b}.conv{K}.norm.*
    layer{N}.{b}.downsample.0.* -> res{N+1}.{b}.shortcut.*
    layer{N}.{b}.downsample.1.* -> res{N+1}.{b}.shortcut.norm.*

BatchNorm ``num_batches_tracked`` counters are not converted (detectron2's FrozenBN has no such
buffer, and BN/SyncBN with a fixed momentum never reads it); heads (``fc``, projector, predictor) are
dropped. Both are reported.
"""

from __future__ import annotations

import builtins
import io
import math
import pickle
import pickletools
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from simsiam_kit.errors import UserError

AUTHOR = "simsiam-kit"
_BN_FIELDS = r"(weight|bias|running_mean|running_var)"
_STEM_CONV = re.compile(r"^conv1\.weight$")
_STEM_BN = re.compile(rf"^bn1\.{_BN_FIELDS}$")
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")
_BLOCK_CONV = re.compile(r"^conv([1-3])\.weight$")
_BLOCK_BN = re.compile(rf"^bn([1-3])\.{_BN_FIELDS}$")
_SHORTCUT_CONV = re.compile(r"^downsample\.0\.weight$")
_SHORTCUT_BN = re.compile(rf"^downsample\.1\.{_BN_FIELDS}$")


def convert_key(key: str) -> Optional[str]:
    """Detectron2 name for one torchvision ResNet key, or None when the key has no counterpart."""
    if _STEM_CONV.match(key):
        return "stem.conv1.weight"
    m = _STEM_BN.match(key)
    if m:
        return f"stem.conv1.norm.{m.group(1)}"
    m = _BLOCK.match(key)
    if not m:
        return None
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    prefix = f"res{stage}.{block}"
    if _BLOCK_CONV.match(rest):
        return f"{prefix}.{rest}"
    b = _BLOCK_BN.match(rest)
    if b:
        return f"{prefix}.conv{b.group(1)}.norm.{b.group(2)}"
    if _SHORTCUT_CONV.match(rest):
        return f"{prefix}.shortcut.weight"
    s = _SHORTCUT_BN.match(rest)
    if s:
        return f"{prefix}.shortcut.norm.{s.group(1)}"
    return None


def check_detectron2_stem(state_dict: dict, source: str = "weights") -> None:
    """Refuse backbones whose stem cannot map onto detectron2's 7x7/2 conv + max-pool stem."""
    w = state_dict.get("conv1.weight")
    if w is None:
        raise UserError(f"{source}: no 'conv1.weight': not a ResNet backbone")
    if tuple(w.shape[-2:]) != (7, 7):
        raise UserError(
            f"{source}: the backbone has a {w.shape[-2]}x{w.shape[-1]} stem conv (the CIFAR stem: 3x3/1, no max-pool); "
            "detectron2's ResNet stem is a 7x7/2 conv plus max-pool, so these weights cannot be converted. "
            "Pretrain with model.stem=imagenet for detection transfer"
        )


@dataclass
class Conversion:
    """Result of :func:`convert_state_dict`."""

    model: dict  # detectron2 name -> numpy array
    mapping: dict  # source key -> detectron2 name
    unconverted: list = field(default_factory=list)  # source keys with no counterpart (heads, counters, ...)


def convert_state_dict(state_dict: dict, source: str = "weights") -> Conversion:
    """Convert a torchvision-style ResNet state dict (BasicBlock or Bottleneck) to detectron2 names."""
    check_detectron2_stem(state_dict, source)
    out: dict[str, np.ndarray] = {}
    mapping: dict[str, str] = {}
    unconverted: list[str] = []
    for k, v in state_dict.items():
        new = convert_key(k)
        if new is None:
            unconverted.append(k)
            continue
        if new in out:  # cannot happen with the map above; guard against future edits
            raise UserError(f"{source}: keys {mapping_inv(mapping)[new]} and {k} both map to {new}")
        arr = v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
        out[new] = np.ascontiguousarray(arr)
        mapping[k] = new
    if "stem.conv1.weight" not in out or not any(n.startswith("res5.") for n in out):
        raise UserError(f"{source}: no ResNet stem/res5 weights found; not a ResNet backbone")
    return Conversion(out, mapping, unconverted)


def mapping_inv(mapping: dict) -> dict:
    return {v: k for k, v in mapping.items()}


def checkpoint_payload(conv: Conversion) -> dict:
    return {"model": conv.model, "__author__": AUTHOR, "matching_heuristics": True}


def _head_keys(path: Path) -> list[str]:
    """Keys of a simsiam-kit checkpoint / state dict that are not backbone weights (dropped heads)."""
    from simsiam_kit.engine.checkpoint import CHECKPOINT_FORMAT, load_file

    obj = load_file(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj.get("model", {})
    if not isinstance(obj, dict) or obj.get("format") is not None:
        return []
    keys = [k for k in obj if isinstance(k, str)]
    if any(k.startswith("backbone.") for k in keys):
        return [k for k in keys if not k.startswith("backbone.")]
    return [k for k in keys if k.startswith("fc.")]


def check_output(output) -> Path:
    output = Path(output)
    if output.suffix != ".pkl":
        raise UserError(f"--output {output}: detectron2 reads converted weights from a .pkl file")
    return output


def convert_backbone(
    state_dict: dict, arch: str, stem: str, source: str, output: Path, log: Callable[[str], None] = print
) -> Conversion:
    """Convert a loaded backbone's ``state_dict`` (read from ``source``) and write ``output`` (.pkl).

    Prints and returns every key left unconverted (``Conversion.unconverted``), including the heads the
    source file holds besides the backbone."""
    output = check_output(output)
    if stem != "imagenet":
        check_detectron2_stem(state_dict, source)
    conv = convert_state_dict(state_dict, source)
    heads = _head_keys(Path(source))
    conv.unconverted = heads + conv.unconverted
    # written atomically, with the mode a plain open() gives (0644 under umask 022: simsiam_kit.utils.io)
    write_detectron2_pkl(checkpoint_payload(conv), output)
    log(f"{source}: {arch} backbone, {len(conv.model)} tensors converted -> {output}")
    if conv.unconverted:
        log(f"left unconverted ({len(conv.unconverted)}):")
        for k in conv.unconverted:
            if k in heads:
                why = "head, not part of the backbone"
            elif k.endswith("num_batches_tracked"):
                why = "BatchNorm step counter, unused by detectron2"
            else:
                why = "no detectron2 counterpart"
            log(f"  {k}  ({why})")
    return conv


def convert_weights(weights: str, output: Path, log: Callable[[str], None] = print) -> Conversion:
    """Load ``weights`` (run dir / checkpoint / backbone.pt / ResNet state dict), write ``output`` (.pkl):
    :func:`convert_backbone` on what :func:`simsiam_kit.weights.load_backbone` reads."""
    from simsiam_kit.weights import load_backbone

    check_output(output)
    loaded = load_backbone(weights)
    notice = loaded.notice()
    if notice:
        log(notice)
    return convert_backbone(loaded.model.state_dict(), loaded.arch, loaded.stem, loaded.source, output, log)


# ----------------------------------------------------------------------------------------------
# detectron2's loading rule, re-implemented for checking (detectron2 itself need not be installed)


def suffix_match(model_keys: Iterable[str], ckpt_keys: Iterable[str]) -> dict:
    """Which checkpoint key each model key loads from under detectron2's ``matching_heuristics``.

    A checkpoint key ``c`` matches a model key ``m`` when ``m == c`` or ``m`` ends with ``"." + c``;
    each model key takes its longest matching checkpoint key. Returns ``{model_key: ckpt_key}``.
    """
    ckpt_keys = list(ckpt_keys)
    out = {}
    for m in model_keys:
        best = None
        for c in ckpt_keys:
            if (m == c or m.endswith("." + c)) and (best is None or len(c) > len(best)):
                best = c
        if best is not None:
            out[m] = best
    return out


def check_against_model(ckpt_shapes: dict, model_shapes: dict) -> dict:
    """Check converted weights against a detectron2 model's ``{key: shape}`` the way detectron2 loads.

    Returns ``{"loaded": {model_key: ckpt_key}, "unused": [ckpt keys matching nothing],
    "ambiguous": {ckpt_key: [model keys]}, "shape_mismatch": [(ckpt_key, model_key, ckpt, model)]}``.
    """
    matched = suffix_match(model_shapes, ckpt_shapes)
    by_ckpt: dict = {}
    mismatch = []
    loaded = {}
    for m, c in matched.items():
        if tuple(ckpt_shapes[c]) != tuple(model_shapes[m]):
            mismatch.append((c, m, tuple(ckpt_shapes[c]), tuple(model_shapes[m])))
            continue
        by_ckpt.setdefault(c, []).append(m)
        loaded[m] = c
    return {
        "loaded": loaded,
        "unused": sorted(c for c in ckpt_shapes if c not in by_ckpt and c not in {x[0] for x in mismatch}),
        "ambiguous": {c: ms for c, ms in by_ckpt.items() if len(ms) > 1},
        "shape_mismatch": mismatch,
    }


# ----------------------------------------------------------------------------------------------
# reading a detectron2 .pkl without running it
#
# detectron2 loads `.pkl` weights with `pickle.load`, and unpickling can call any importable function
# (`os.system` through `__reduce__`, `builtins.eval`, ...). A `.pkl` given as `--weights` is therefore
# loaded here first, by an unpickler that resolves only the handful of globals a pickle of numpy arrays
# needs, each replaced by a checked stand-in; detectron2 then reads a copy written from what was
# accepted (:func:`write_detectron2_pkl`), never the original file.

PICKLE_ALLOWED = "numpy arrays and dtypes, dict/list/tuple/set/OrderedDict, str, int, float, bool and None"
MAX_PICKLE_DEPTH = 32  # containers nested deeper are not weights (and would break pickle.dumps later)


class _Refused(Exception):
    pass


_NDARRAY = object()  # stands in for numpy.ndarray: only ever an argument of _reconstruct, never called


def _checked_dtype(*args):
    dt = np.dtype(*args)
    if dt.hasobject:
        raise _Refused(f"numpy dtype {dt} (holds Python objects)")
    return dt


def _shape(shape) -> tuple:
    if not isinstance(shape, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise _Refused(f"array shape {shape!r}")
    return shape


def _reconstruct(subtype, shape, dtype):
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``: an empty array that BUILD then fills
    (``ndarray.__setstate__`` checks the data's length against the shape). numpy always pickles an empty
    shape here; a larger one would allocate memory the file does not hold."""
    if subtype is not _NDARRAY or not isinstance(dtype, (bytes, str, np.dtype)):
        raise _Refused("numpy _reconstruct of something other than an ndarray")
    if math.prod(_shape(shape)) != 0:
        raise _Refused(f"numpy _reconstruct with a non-empty shape {shape}")
    return np.ndarray(shape, _checked_dtype(dtype))


def _frombuffer(buf, dtype, shape, order):
    """``numpy.core.numeric._frombuffer`` (pickle protocol 5): an array over bytes in the file."""
    if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or order not in ("C", "F"):
        raise _Refused("numpy _frombuffer with unexpected arguments")
    dtype = _checked_dtype(dtype)
    if math.prod(_shape(shape)) * dtype.itemsize != len(buf):
        raise _Refused(f"numpy _frombuffer: shape {shape} of {dtype} does not match {len(buf)} bytes")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode(str, 'latin1')``: how protocol 0-2 pickles spell a bytes object (array data)."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1")


_PICKLE_GLOBALS = {
    **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _checked_dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): OrderedDict,
    **{(m, n): getattr(builtins, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"global '{module}.{name}'") from None

    def persistent_load(self, pid):
        raise _Refused("a persistent id")


def _check_payload(obj) -> None:
    """Every value is an allowed container, scalar or numeric array, nested at most MAX_PICKLE_DEPTH deep."""
    stack = [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        if depth > MAX_PICKLE_DEPTH:
            raise _Refused(f"containers nested deeper than {MAX_PICKLE_DEPTH}")
        if x is None or type(x) in (str, int, float, bool, np.dtype) or isinstance(x, np.dtype):
            continue
        if type(x) is np.ndarray:
            if x.dtype.hasobject:
                raise _Refused(f"numpy array of dtype {x.dtype}")
            continue
        if type(x) in (dict, OrderedDict):
            stack.extend((v, depth + 1) for kv in x.items() for v in kv)
        elif type(x) in (list, tuple, set, frozenset):
            stack.extend((v, depth + 1) for v in x)
        else:
            raise _Refused(f"a value of type {type(x).__module__}.{type(x).__qualname__}")


def load_detectron2_pkl(path) -> dict:
    """The content of a detectron2 ``.pkl`` (``{"model": {name: array}, ...}``, or a Caffe2/Detectron1 model
    zoo dict) through a restricted unpickler: only numpy arrays and dtypes, plain containers, str, int,
    float, bool and None are built; any other global (``os.system``, ``builtins.eval``, a class of another
    module), a persistent id or an object dtype is refused before it is called, with a :class:`UserError`
    naming the file and what was refused. Every length the pickle declares is checked against the file
    first (``pickletools.genops``), so a small file cannot make the loader allocate more than its size."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise UserError(f"weights not found: {p}") from None
    why = f"a detectron2 .pkl may hold only {PICKLE_ALLOWED}; anything else could run code when unpickled"
    try:
        for _ in pickletools.genops(io.BytesIO(data)):  # declared lengths vs the bytes there, no allocation
            pass
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
        _check_payload(obj)
    except _Refused as e:
        raise UserError(f"{p}: refused to unpickle {e} ({why})") from None
    except Exception as e:  # a malformed pickle: truncated, bad opcode, wrong arguments, ...
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"{p}: not a readable pickle ({type(e).__name__}{': ' + msg if msg else ''})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{p}: holds a {type(obj).__name__}, not the dict of a detectron2 checkpoint")
    return obj


def write_detectron2_pkl(payload: dict, output) -> Path:
    """Write ``payload`` (accepted by :func:`load_detectron2_pkl`, or built by the converter) as a ``.pkl``
    detectron2 reads; atomic, with the mode a plain ``open()`` gives."""
    from simsiam_kit.utils.io import atomic_write_bytes

    output = Path(output)
    atomic_write_bytes(output, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    return output
