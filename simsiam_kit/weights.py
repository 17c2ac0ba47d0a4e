"""Load a backbone from whatever a user points at: the one resolver of a weights spec.

A weights spec (``--weights`` of every command) is one of, decided by :func:`resolve_weights` and
nowhere else:

* ``random``: a randomly initialised backbone (the baseline row). Its architecture, stem, seed and
  image settings come from a run (``like``: the run's own initial weights, bit for bit, and the run's
  image size and normalisation), or from ``arch``/``stem`` (stem default ``imagenet``, seed 0).
* a pretraining run directory: ``backbone.pt``, unless ``checkpoints/last.pt`` records a later epoch (a
  run killed between the two writes by a version that wrote the checkpoint first);
* a file: a simsiam-kit checkpoint or ``backbone.pt``; another project's checkpoint, recognised by its
  content (official SimSiam / MoCo v2 / MoCo v3 ``.pth.tar``, DINO ``checkpoint.pth``, lightly and
  solo-learn Lightning ``.ckpt``, mmpretrain, timm / torchvision state dicts, ``.safetensors``: see
  :mod:`simsiam_kit.weight_formats`); arch and stem inferred from its keys unless the file names them.
  ``FILE#NAME`` reads another encoder of a file holding several (``#student`` of a DINO checkpoint,
  ``#encoder_k`` of MoCo v2's). Files that are something else (an ONNX model, a Detectron2 ``.pkl``,
  YAML, an ``.npz``) are named as what they are.

Every file is read once: its bytes are hashed (sha256) and loaded with ``weights_only=True`` from those
same bytes (never unpickling more than tensors and plain containers: a class a checkpoint names, such
as DINO's ``argparse.Namespace``, is read as an inert placeholder; a pickled ``nn.Module`` is refused with
the re-save advice), so the hash recorded in an evaluation's ``results.json`` is that of the weights it used
(:attr:`LoadedBackbone.record`). Weights holding NaN or inf are refused (:func:`load_state_dict_checked`).
A run directory whose lock is held by a live process is a run still training: the record says so.

torch is imported only when weights are loaded, so a command can check a spec before paying for it.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from simsiam_kit.config import IMAGENET_MEAN, IMAGENET_STD
from simsiam_kit.engine.run_dir import RunDir
from simsiam_kit.errors import UserError
from simsiam_kit.utils.dirlock import lock_holder
from simsiam_kit.utils.io import open_regular, read_bytes_bounded
from simsiam_kit.weight_formats import is_safetensors

if TYPE_CHECKING:
    import torch

RANDOM = "random"
#: the largest weights file read (a ResNet-101 checkpoint with its optimizer state is well under 1 GiB)
MAX_WEIGHTS_BYTES = 8 << 30
ACCEPTED = (
    "a run directory, a simsiam-kit checkpoint or backbone.pt, a ResNet state dict or checkpoint "
    "(.pt/.pth/.pth.tar/.ckpt/.safetensors: torchvision, timm, official SimSiam/MoCo, DINO, lightly, "
    "solo-learn, mmpretrain), or 'random'"
)
SELECT = "#"  # FILE#NAME: another encoder of a file holding several
# torch.save's legacy (non-zip) format starts with this pickled magic number (torch.serialization.MAGIC_NUMBER)
_TORCH_LEGACY_HEAD = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:-1]


def is_random(spec) -> bool:
    return str(spec).strip() == RANDOM


@dataclass(frozen=True)
class WeightsSpec:
    """What a weights spec names, decided without loading anything."""

    spec: str
    random: bool
    run_dir: Optional[Path] = None  # the run the weights belong to (for ``random``: the ``like`` run)
    path: Optional[Path] = None  # the file named by the spec (None: random, or a run directory)
    select: Optional[str] = None  # FILE#NAME: the encoder copy to read (None: the one its project evaluates)

    def file(self) -> Path:
        """The file to read: the spec's file, or the run directory's newest weights."""
        if self.random:
            raise ValueError("random weights have no file")
        if self.path is not None:
            return self.path
        if self.run_dir is None:  # not reached: a spec names a file, a run or random
            raise ValueError(f"{self.spec}: names neither a file nor a run")
        return run_weights_file(self.run_dir)


def _run_of_file(path: Path) -> Optional[Path]:
    """The run directory a ``backbone.pt`` or ``checkpoints/last.pt`` lies in, if it lies in one."""
    for root in (path.parent, path.parent.parent):
        run = RunDir(root)
        if run.config.is_file() and path.resolve() in (run.backbone.resolve(), run.checkpoint.resolve()):
            return root
    return None


def describe_foreign_file(path: Path) -> Optional[str]:
    """What a file is when it is not PyTorch weights (an ONNX model, a pickle, text, an archive), else None."""
    try:
        with open_regular(path) as f:
            head = f.read(4096)
    except (OSError, UserError):
        return None
    suffix = path.suffix.lower()
    if is_safetensors(head):
        return None  # weights (timm's and the Hugging Face hub's format)
    if head.startswith(b"PK\x03\x04"):
        try:
            names = zipfile.ZipFile(path).namelist()
        except (zipfile.BadZipFile, OSError):
            return "a damaged zip archive"
        if any(n.endswith("data.pkl") for n in names):
            return None  # torch.save's zip format
        if any(n.endswith(".npy") for n in names):
            return "a NumPy .npz archive (a dataset?)"
        return "a zip archive"
    if head.startswith(b"\x80"):
        if head[2:].startswith(_TORCH_LEGACY_HEAD):
            return None  # torch.save's legacy format
        return (
            "a Python pickle (Detectron2 checkpoints are .pkl pickles: only the detectron2 detection engine reads them)"
        )
    if suffix == ".onnx" or (head[:1] == b"\x08" and any(s in head for s in (b"pytorch", b"simsiam-kit", b"onnx"))):
        return "an ONNX model (written by 'export onnx'; 'embed' and 'search' read it)"
    if head and b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if suffix in (".yaml", ".yml"):
            return "a YAML text file (a config?)"
        if suffix == ".json":
            return "a JSON text file"
        return "a text file"
    return None


def resolve_weights(spec: str, like: Optional[str] = None) -> WeightsSpec:
    """Decide what ``spec`` names (cheap: nothing is loaded, torch is not imported). ``like``: a run
    directory whose settings ``random`` takes. A :class:`UserError` for a missing path, a run directory
    without weights, a file that is not PyTorch weights, or ``like`` with weights of their own."""
    spec = str(spec)
    if is_random(spec):
        like_dir = None
        if like is not None:
            like_dir = Path(like).expanduser()
            if not RunDir(like_dir).config.is_file():
                raise UserError(
                    f"{like_dir}: no config.yaml, not a simsiam-kit run directory (random weights "
                    "take their architecture, seed and image settings from a run)"
                )
        return WeightsSpec(spec, True, like_dir)
    if like is not None:
        raise UserError(f"'like' a run applies to random weights only; {spec} has settings of its own")
    p, select = Path(spec).expanduser(), None
    if not p.exists() and SELECT in spec:  # FILE#NAME (a file whose own name holds '#' is read as it is)
        head, _, select = spec.rpartition(SELECT)
        p = Path(head).expanduser()
        if not select or not select.replace(".", "").replace("_", "").isalnum():
            raise UserError(f"{spec}: '{SELECT}{select}' is not an encoder name (expected FILE#NAME, e.g. #student)")
        if p.is_dir():
            raise UserError(f"{spec}: '{SELECT}NAME' picks an encoder of a file holding several, not of a run")
    if p.is_dir():
        run = RunDir(p)
        if not (run.backbone.is_file() or run.checkpoint.is_file()):
            raise UserError(f"{p}: no backbone.pt or checkpoints/last.pt in this run directory")
        return WeightsSpec(spec, False, p)
    if not p.exists():
        raise UserError(f"weights not found: {p} (expected {ACCEPTED})")
    open_regular(p, "weights").close()  # a link to /dev/zero, a FIFO, a device: refused before any read
    what = describe_foreign_file(p)
    if what:
        raise UserError(f"cannot load {p}: it is {what}, not PyTorch weights (expected {ACCEPTED})")
    return WeightsSpec(spec, False, _run_of_file(p), p, select)


def _saved_epoch(path: Path) -> Optional[int]:
    """The ``epoch`` a simsiam-kit backbone/checkpoint file records, read through a memory map (the
    tensors are not read); None when it cannot be told."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(obj["epoch"]) if isinstance(obj, dict) and "epoch" in obj else None
    except Exception:
        return None


def run_weights_file(run_dir: Path) -> Path:
    """``backbone.pt`` unless ``checkpoints/last.pt`` records a later epoch (never present stale weights)."""
    run = RunDir(run_dir)
    backbone, ckpt = run.backbone, run.checkpoint
    if backbone.is_file() and ckpt.is_file():
        b, c = _saved_epoch(backbone), _saved_epoch(ckpt)
        if b is not None and c is not None and b < c:
            return ckpt
    for cand in (backbone, ckpt):
        if cand.is_file():
            return cand
    raise UserError(f"{run_dir}: no backbone.pt or checkpoints/last.pt in this run directory")


def resolve_weights_path(spec: str) -> Path:
    """The file a (non-random) spec reads."""
    return resolve_weights(spec).file()


def split_selector(spec: str) -> tuple[str, Optional[str]]:
    """(file or run spec, encoder name or None) of a weights spec (``FILE#NAME``)."""
    ws = resolve_weights(spec)
    return (str(ws.path) if ws.select else spec), ws.select


def run_lock_holder(run_dir: Path) -> Optional[int]:
    """The pid of the live process that holds ``RUN/.lock`` (a run still training), 0 when it is held by a
    process whose pid cannot be told, None when nobody holds it (:func:`simsiam_kit.utils.dirlock.lock_holder`:
    the lock is not touched)."""
    return lock_holder(run_dir)


@dataclass
class LoadedBackbone:
    model: torch.nn.Module
    arch: str
    stem: str
    source: str  # the file read, or "random"
    weights_settings: dict = field(default_factory=dict)  # image_size/mean/std stored with the weights
    config_settings: dict = field(default_factory=dict)  # image_size/mean/std of the run's config
    meta: dict = field(default_factory=dict)  # everything else the file records
    record: dict = field(default_factory=dict)  # what results files store about the weights
    summary: Optional[str] = None  # what a foreign file held and what was read, in one line
    unused_report: Optional[str] = None  # the keys not loaded, grouped (as detectron2's converter lists)

    def _setting(self, name):
        return self.weights_settings.get(name) or self.config_settings.get(name)

    @property
    def image_size(self) -> Optional[int]:
        return self._setting("image_size")

    @property
    def mean(self) -> tuple:
        return tuple(self._setting("mean") or IMAGENET_MEAN)

    @property
    def std(self) -> tuple:
        return tuple(self._setting("std") or IMAGENET_STD)

    @property
    def in_progress(self) -> bool:
        return self.record.get("run_in_progress") is not None

    def notice(self) -> Optional[str]:
        """What the user is told about the weights, else None: what another project's file held and what
        was read from it (one line, then the keys not loaded), and a run still training (its weights may
        change under the evaluation)."""
        lines = [x for x in (self.summary, self.unused_report, self._training_notice()) if x]
        return "\n".join(lines) if lines else None

    def _training_notice(self) -> Optional[str]:
        r = self.record
        if r.get("run_in_progress") is None:
            return None
        pid = f" (pid {r['run_in_progress']})" if r["run_in_progress"] else ""
        epoch = f" of epoch {r['epoch']}" if r.get("epoch") is not None else ""
        return (
            f"note: {r['run_dir']} is still training{pid}; using {Path(r['file']).name}{epoch} as it is now "
            f"(sha256 {r['sha256'][:12]}, recorded in the results)"
        )


def _settings_of(cfg: Optional[dict]) -> dict:
    data = (cfg or {}).get("data", {}) or {}
    return {
        "image_size": data.get("image_size"),
        "mean": tuple(data.get("mean") or ()) or None,
        "std": tuple(data.get("std") or ()) or None,
    }


def _extract(obj, path: Path, select: Optional[str] = None, file_meta: Optional[dict] = None):
    """What a loaded file holds (:class:`~simsiam_kit.weight_formats.Extracted`): simsiam-kit's own
    formats here, every other container by :func:`~simsiam_kit.weight_formats.extract_foreign`."""
    from simsiam_kit.engine.checkpoint import BACKBONE_FORMAT, CHECKPOINT_FORMAT, clean_state_dict
    from simsiam_kit.weight_formats import Extracted, extract_foreign

    own = isinstance(obj, dict) and obj.get("format") in (BACKBONE_FORMAT, CHECKPOINT_FORMAT)
    if own and select is not None:
        raise UserError(f"{path}#{select}: a simsiam-kit file holds one backbone; drop '#{select}'")
    if isinstance(obj, dict) and obj.get("format") == BACKBONE_FORMAT:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        for k, want in (("arch", str), ("stem", str), ("epoch", int), ("image_size", int)):
            if meta.get(k) is not None and (not isinstance(meta[k], want) or isinstance(meta[k], bool)):
                raise UserError(f"{path}: '{k}' is {meta[k]!r}, expected a {want.__name__} ({BACKBONE_FORMAT} file)")
        sd = clean_state_dict(_tensor_dict(obj, "state_dict", path))
        return Extracted(sd, "simsiam-kit backbone", "backbone", meta=meta)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        sd = clean_state_dict(_tensor_dict(obj, "model", path))
        bb = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
        if not bb:
            raise UserError(f"{path}: checkpoint holds no backbone weights")
        cfg = obj.get("config", {}) or {}
        model = (cfg.get("model", {}) or {}) if isinstance(cfg, dict) else None
        if not isinstance(model, dict):
            raise UserError(f"{path}: 'config' of this checkpoint is not a config mapping")
        epoch = obj.get("epoch")
        if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
            raise UserError(f"{path}: 'epoch' is {epoch!r}, expected an integer")
        meta = {"arch": model.get("arch"), "stem": model.get("stem"), "epoch": epoch}
        return Extracted(bb, "simsiam-kit checkpoint", "checkpoint", meta=meta, config=cfg)
    label = f"{path}#{select}" if select else str(path)
    return extract_foreign(obj, label, select, file_meta)


def _tensor_dict(obj: dict, key: str, path: Path) -> dict:
    """``obj[key]``, which a file marked with a simsiam-kit ``format`` must hold as a state dict."""
    import torch

    if key not in obj:
        raise UserError(f"{path}: marked '{obj.get('format')}' but holds no '{key}'")
    sd = obj[key]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise UserError(f"{path}: '{key}' is not a state dict (names -> tensors), got {type(sd).__name__}")
    return sd


@dataclass
class SafetensorsContent:
    """What a ``.safetensors`` file holds: its tensors and its ``__metadata__`` (strings)."""

    tensors: dict
    metadata: dict


class _Opaque(dict):
    """A stand-in for a class a checkpoint names besides tensors (DINO's ``argparse.Namespace``, Lightning's
    ``AttributeDict``): built without running any of that class's code, its state kept as plain data."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        self.__dict__["_state"] = state


#: classes whose presence means a pickled module (``torch.save(model)``), refused with the re-save advice
_MODULE_PREFIXES = ("torch.nn.modules.", "torchvision.models.", "timm.models.")
_PICKLED_MODULE = (
    "a PyTorch file that stores pickled Python objects (a model: torch.save(model)); weights are read with "
    "weights_only=True and no code from a file is ever run, so only state dicts and checkpoints load "
    "(re-save it with torch.save(model.state_dict(), PATH))"
)


def _load_with_placeholders(data: bytes, path: Path):
    """``torch.load(weights_only=True)`` of a checkpoint that names classes besides tensors: each is
    replaced by an inert :class:`_Opaque` (nothing is imported or called); a pickled module is refused."""
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    names = get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    if any(n.startswith(_MODULE_PREFIXES) for n in names):
        raise UserError(f"{path}: {_PICKLED_MODULE}")
    stubs: list[Any] = [(type(f"Opaque{i}", (_Opaque,), {}), n) for i, n in enumerate(names)]
    with safe_globals(stubs):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_weights_file(path: Path):
    """Load ``path`` once: (object, sha256, size); a ``.safetensors`` file (by content) as a
    :class:`SafetensorsContent`. ``weights_only=True``; one-line errors."""
    import torch

    from simsiam_kit.weight_formats import is_safetensors, read_safetensors

    path = Path(path)
    try:
        data = read_bytes_bounded(path, MAX_WEIGHTS_BYTES, "weights")
    except FileNotFoundError:
        raise UserError(f"weights not found: {path}") from None
    what = describe_foreign_file(path)
    if what:
        raise UserError(f"cannot load {path}: it is {what}, not PyTorch weights (expected {ACCEPTED})")
    digest = hashlib.sha256(data).hexdigest()
    if is_safetensors(data[:16]):
        tensors, metadata = read_safetensors(data, str(path))
        return SafetensorsContent(tensors, metadata), digest, len(data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "Weights only load failed" in text:
            try:
                obj = _load_with_placeholders(data, path)
            except UserError:
                raise
            except Exception:
                raise UserError(f"{path}: {_PICKLED_MODULE}") from None
            return obj, digest, len(data)
        msg = text.splitlines()[0] if text else type(e).__name__
        raise UserError(f"cannot load {path}: not a readable PyTorch checkpoint ({msg[:200]})") from None
    return obj, digest, len(data)


def random_backbone(arch: str, stem: str = "imagenet", zero_init_residual: bool = True, seed: int = 0):
    """The backbone ``torch.manual_seed(seed)`` followed by building it gives: a pretraining run's own initial
    weights when ``seed`` is the run's ``train.seed``. The global RNG is left as it was."""
    import torch

    from simsiam_kit.models.backbones import build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_backbone(arch, stem, zero_init_residual)


def _run_config(run_dir: Path) -> dict:
    from simsiam_kit.config import PretrainConfig, load_config, to_dict

    return to_dict(load_config(PretrainConfig, str(RunDir(run_dir).config)))


def _load_random(ws: WeightsSpec, arch: Optional[str], stem: Optional[str], seed: int) -> LoadedBackbone:
    if ws.run_dir is not None:  # like a run: its architecture, stem, init seed and image settings
        cfg = _run_config(ws.run_dir)
        model = cfg["model"]
        for name, want, have in (("architecture", arch, model["arch"]), ("stem", stem, model["stem"])):
            if want is not None and want != have:
                raise UserError(
                    f"{ws.run_dir} trains a {model['arch']} with the {model['stem']} stem; the "
                    f"requested {name} {want} would not be that run's random init"
                )
        seed = int(cfg["train"]["seed"])
        m = random_backbone(model["arch"], model["stem"], bool(model.get("zero_init_residual", True)), seed)
        record = {
            "spec": RANDOM,
            "kind": "random",
            "like": str(ws.run_dir),
            "seed": seed,
            "init": f"the initial weights of {ws.run_dir} (seed {seed})",
        }
        return LoadedBackbone(m, model["arch"], model["stem"], RANDOM, config_settings=_settings_of(cfg), record=record)
    if arch is None:
        raise UserError("random weights need an architecture (for example resnet18), or a run to be like")
    m = random_backbone(arch, stem or "imagenet", True, seed)
    record = {"spec": RANDOM, "kind": "random", "like": None, "seed": seed, "init": f"seed {seed}"}
    return LoadedBackbone(m, arch, stem or "imagenet", RANDOM, record=record)


def load_backbone(
    spec: str, arch: Optional[str] = None, stem: Optional[str] = None, seed: int = 0, like: Optional[str] = None
) -> LoadedBackbone:
    """The backbone a weights spec names, loaded once. ``arch``/``stem``: what the caller expects; weights
    that do not fit them are refused with the missing / unexpected / mis-shaped keys and what the file
    holds. ``seed``/``like``: for ``random`` (see the module docstring)."""
    from simsiam_kit.models.backbones import build_backbone, check_buildable, infer_arch, infer_stem
    from simsiam_kit.weight_formats import metadata_from_safetensors

    ws = resolve_weights(spec, like)
    if ws.random:
        return _load_random(ws, arch, stem, seed)
    path = ws.file()
    obj, digest, size = read_weights_file(path)
    if isinstance(obj, SafetensorsContent):
        found = _extract(obj.tensors, path, ws.select, metadata_from_safetensors(obj.metadata))
        found.format = "safetensors file" + (f" ({found.format})" if found.format != "state dict" else "")
    else:
        found = _extract(obj, path, ws.select)
    sd, meta, cfg, kind = found.state_dict, found.meta, found.config, found.kind
    label = f"{path}#{ws.select}" if ws.select else str(path)
    check_buildable(sd, label)  # the families' key checks, then variants no entry builds
    own = kind in ("backbone", "checkpoint")  # another project's 'arch' is its own name: the layout decides
    found_arch = (meta.get("arch") if own else None) or infer_arch(sd)
    found_stem = meta.get("stem") or infer_stem(sd, found_arch)
    want_arch, want_stem = arch or found_arch, stem or found_stem
    model = build_backbone(want_arch, want_stem)
    try:
        load_state_dict_checked(model, sd, label)
    except UserError as e:
        if (want_arch, want_stem) == (found_arch, found_stem):
            raise
        raise UserError(
            f"{e} (the file holds a {found_arch} with the {found_stem} stem; requested "
            f"{want_arch} with the {want_stem} stem)"
        ) from None
    run_dir = ws.run_dir
    if run_dir is not None and not cfg and RunDir(run_dir).config.is_file():
        try:
            cfg = _run_config(run_dir)
        except UserError:
            cfg = {}
    holder = run_lock_holder(run_dir) if run_dir is not None else None
    epoch = meta.get("epoch")
    record = {
        "spec": str(spec),
        "kind": kind,
        "file": str(path),
        "sha256": digest,
        "bytes": size,
        "epoch": int(epoch) if epoch is not None else None,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "run_in_progress": holder,
    }
    if kind not in ("backbone", "checkpoint"):  # another project's file: what was read from it
        record.update(format=found.format, copy=found.copy or None, unused_keys=len(found.unused))
    weights_settings = {k: meta.get(k) for k in ("image_size", "mean", "std")}
    for k in ("mean", "std"):
        weights_settings[k] = tuple(weights_settings[k]) if weights_settings[k] else None
    return LoadedBackbone(
        model,
        want_arch,
        want_stem,
        str(path),
        weights_settings=weights_settings,
        config_settings=_settings_of(cfg),
        meta=meta,
        record=record,
        summary=None if kind in ("backbone", "checkpoint") else found.summary(),
        unused_report=None if kind in ("backbone", "checkpoint") else found.unused_report(),
    )


def check_finite(sd: dict, source: str) -> None:
    """Refuse weights that hold NaN or inf (a diverged run's): one line naming the file."""
    from simsiam_kit.engine.checkpoint import describe_nonfinite, nonfinite_tensors

    bad, total = nonfinite_tensors(sd)
    if bad:
        raise UserError(
            f"{source}: non-finite weights, {describe_nonfinite(bad, total)}; "
            "these weights come from a diverged run and cannot be used"
        )


def load_state_dict_checked(model, sd: dict, source: str) -> None:
    """Strict load with an error that lists missing, unexpected and mis-shaped keys; finite weights only, and
    floating-point where the model's are (``load_state_dict`` would cast int64 weights silently)."""
    check_finite(sd, source)
    own = model.state_dict()
    for k, v in own.items():
        if k in sd and v.is_floating_point() and not sd[k].is_floating_point():
            raise UserError(
                f"{source}: '{k}' holds {str(sd[k].dtype).replace('torch.', '')} values; weights must be "
                "floating-point (a cast to integers destroyed them)"
            )
    # torch's strict load fills a missing BatchNorm step counter itself (older saves, converted files)
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shape = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
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
