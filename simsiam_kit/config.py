"""Typed, frozen configuration.

YAML files in ``configs/pretrain/`` load into the dataclasses below. Unknown keys and values of the
wrong type fail with a :class:`UserError` naming the key and the file. ``--set a.b=c`` overrides are
parsed as YAML scalars (``--set optim.epochs=3``, ``--set model.predictor=false``). Every YAML the
project reads (config files, ``--set`` values, ``config.amendments.yaml``) goes through one bounded
loader (:func:`parse_yaml`, :func:`load_yaml`): no anchors or aliases, at most :data:`MAX_CONFIG_BYTES`.
The config is never mutated during a run; the resolved one is written to ``config.yaml``.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from simsiam_kit.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # checked by utils.device.resolve_precision too
FLOAT32_MAX = 3.4028234663852886e38

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_ROOT = "~/.cache/simsiam-kit/data"  # torchvision datasets live / are downloaded here
# Defaults stated once; every command, config field and library default reads them from here.
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # normalisation when neither an option, the weights nor a run config say
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_KNN_K = 200  # kNN neighbours and vote temperature (InstDisc, Wu et al. 2018)
DEFAULT_KNN_TEMPERATURE = 0.1
# kNN votes are sums of exp(similarity / T) in float32: below this T, exp(1 / T) times the number of
# neighbours can overflow to inf and every class ties (exp(1 / 0.02) ~ 5e21 leaves room for 6e16 neighbours)
MIN_KNN_TEMPERATURE = 0.02
MAX_DIST_TIMEOUT_S = 30 * 86400.0  # a collective timeout beyond 30 days is a typo (and overflows timedelta)
DEFAULT_CROP_PCT = 0.875  # image files: shorter side to size / 0.875, then a centre crop of size
DEFAULT_FEATURE_BATCH = 256  # images per forward when extracting features (eval commands, kNN monitor)


def config_dirs() -> list[Path]:
    """Where config names are looked up, first match wins: ``./configs`` (a user's own), the installed
    package data ``simsiam_kit.configs``, then the source tree's ``configs/`` (a checkout without install)."""
    dirs = [Path.cwd() / "configs"]
    try:
        from importlib.resources import files

        dirs.append(Path(str(files("simsiam_kit.configs"))))
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    dirs.append(REPO_ROOT / "configs")
    return list(dict.fromkeys(dirs))


@dataclass(frozen=True)
class DataConfig:
    # Dataset spec (see docs/datasets.md / README): demo, path.npz, ImageFolder dir, cifar10, ...,
    # optionally followed by a slice such as "[:2000]".
    train: str = "demo:train"
    # Labelled set used as kNN-monitor queries (the train set, without augmentation, is the bank).
    val: Optional[str] = "demo:val"
    root: str = DEFAULT_DATA_ROOT  # where torchvision datasets live / are downloaded
    download: bool = False  # explicit switch: nothing is downloaded unless this is true
    image_size: int = 32
    crop_min_scale: float = 0.2  # RandomResizedCrop scale=(0.2, 1.0)
    color_jitter_prob: float = 0.8
    color_jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0  # 0.5 for ImageNet (sigma in [0.1, 2.0]); CIFAR recipe has no blur
    blur_sigma: tuple = (0.1, 2.0)
    flip_prob: float = 0.5
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    # DataLoader workers for file datasets (in-memory sets need none). null/auto: 2 on the CPU (the
    # training threads need the cores); on CUDA the cores this process may use, shared among the
    # processes of the node, less one for the training loop, at most 16 (utils.device.resolve_workers).
    workers: Optional[int] = None
    # Keep an in-memory dataset (npz, CIFAR, STL-10, demo) on the GPU as one uint8 tensor and gather
    # batches there. null/auto = on for CUDA when it takes at most a quarter of the GPU's memory.
    device_resident: Optional[bool] = None
    skip_bad_images: bool = False  # skip and count unreadable images instead of failing


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"
    stem: str = "cifar"  # "cifar" (3x3 conv, no max-pool) or "imagenet" (7x7/2 conv + max-pool)
    zero_init_residual: bool = True
    proj_dim: int = 2048
    proj_hidden: int = 2048  # paper: hidden fc 2048-d (official code uses the backbone width)
    proj_layers: int = 2  # 3 for ImageNet, 2 for CIFAR (paper appendix D)
    pred_hidden: int = 512
    predictor: bool = True  # ablation (paper Table 1): no predictor -> collapse
    stop_gradient: bool = True  # ablation (paper Fig. 2): no stop-gradient -> collapse


@dataclass(frozen=True)
class LossConfig:
    symmetric: bool = True  # D(p1, sg(z2))/2 + D(p2, sg(z1))/2; False: D(p1, sg(z2)) only


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 800
    batch_size: int = 512  # global batch (split over processes)
    base_lr: float = 0.03  # lr = base_lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    fix_pred_lr: bool = False  # keep the predictor at the initial lr (paper Sec. 4.4 / official code)
    warmup_epochs: float = 0.0  # linear warm-up (not in the paper's recipe; 0 = off)
    schedule: str = "cosine"  # "cosine" (paper) or "constant"
    lr_per_step: bool = False  # official code updates the cosine lr once per epoch


@dataclass(frozen=True)
class TrainConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 when the hardware supports it) | fp32 | bf16 | fp16
    channels_last: Optional[bool] = None  # null/auto = on where it helps (CPU with bf16, CUDA)
    # a linear head on detached backbone features trained alongside (engine/online_probe.py): null/auto =
    # on when the data are labelled, in memory and a val set is given; its val top-1 goes into metrics.jsonl
    online_probe: Optional[bool] = None
    # torch.compile the model and the GPU augmentation. null/auto = the measured default per device
    # (simsiam_kit.utils.device.COMPILE_AUTO; benchmarks/results/gpu_check.json).
    compile: Optional[bool] = None
    seed: int = 0
    deterministic: bool = False
    sync_bn: bool = True  # SyncBatchNorm when running under torchrun with >1 process
    checkpoint_every: int = 1  # epochs; a checkpoint is always written at the end
    knn_every: int = 1  # epochs between kNN monitor evaluations (0 = off)
    knn_k: int = DEFAULT_KNN_K
    knn_temperature: float = DEFAULT_KNN_TEMPERATURE
    knn_bank_limit: int = 0  # use at most this many train images as the kNN bank (0 = all)
    collapse_warn_std: float = 0.1  # warn when std * sqrt(d) falls below this (healthy ~1)
    log_every: int = 10  # steps between metrics.jsonl lines
    progress: bool = True
    max_steps_per_epoch: int = 0  # 0 = full epochs; >0 truncates (for quick experiments)
    plots: bool = True
    # DDP: how long a collective waits for a peer that hangs without dying (a dead one is torn down by
    # torchrun at once). Must exceed the longest rank-0-only phase (the kNN monitor, a checkpoint write).
    dist_timeout_s: float = 1800.0


@dataclass(frozen=True)
class LogConfig:
    # TensorBoard event files in RUN/tensorboard: null/auto = on when the tensorboard package is installed
    tensorboard: Optional[bool] = None
    wandb: bool = False  # Weights & Biases (pip install wandb; WANDB_MODE=offline works without a network)
    wandb_project: str = "simsiam-kit"
    view_pairs: int = 8  # augmented view pairs drawn to TensorBoard/W&B at the start of a run (0 = none)


@dataclass(frozen=True)
class PretrainConfig:
    name: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


# --------------------------------------------------------------------------------------------
# building dataclasses from dicts, with strict checking


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if (value is None or value == "auto") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            return _coerce(value, a, key, source)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        return _from_dict(tp, value, source, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: key '{key}' must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{source}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{source}: key '{key}' must be a string, got {value!r}")
        return value
    if tp is tuple:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise UserError(f"{source}: key '{key}' must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    raise UserError(f"{source}: key '{key}' has unsupported type {_type_name(tp)}")


def _from_dict(cls, d: dict, source: str, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for k in d:
        if k not in names:
            raise UserError(
                f"{source}: unknown config key '{prefix}{k}' (valid keys under "
                f"'{prefix.rstrip('.') or '<top>'}': {', '.join(sorted(names))})"
            )
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in d.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    def conv(v):
        if is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def resolve_config_path(name_or_path: str, group: str = "pretrain") -> Path:
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        return p
    for d in config_dirs():
        cand = d / group / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    avail = sorted({c.stem for d in config_dirs() if (d / group).is_dir() for c in (d / group).glob("*.yaml")})
    raise UserError(f"unknown {group} config '{name_or_path}' (available: {', '.join(avail) or 'none'})")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set '{item}': expected key=value (for example optim.epochs=10)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set '{item}': empty key")
    if len(raw) > 4096:
        raise UserError(f"--set {key}: the value is {len(raw)} characters long (at most 4096)")
    if raw.strip() == "":
        return key.split("."), ""
    try:
        value = parse_yaml(raw, f"--set {key}")
    except _NotYaml:
        value = raw  # not valid YAML: the literal string
    return key.split("."), value


def merge_overrides(raw: dict, overrides: list[str] | None) -> dict:
    out = _deepcopy(raw)
    for item in overrides or []:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"--set {item}: '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


#: A config is a few KB of YAML; a larger file is refused before it is parsed.
MAX_CONFIG_BYTES = 256 << 10


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases (``&name``, ``*name``, and so ``<<:`` merges).

    An alias makes two places of a document one object: a few hundred bytes of nested aliases stand for
    billions of nodes, which any copy of the config (``--set`` merges one) expands until memory runs out.
    Configs need no aliases, so the first anchor or alias stops the load, before anything is built."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            what = f"alias '*{event.anchor}'" if isinstance(event, yaml.AliasEvent) else f"anchor '&{event.anchor}'"
            raise UserError(
                f"{self.name}: YAML {what} at line {event.start_mark.line + 1}: anchors and aliases "
                "are not allowed in configs (write the values out)"
            )
        return super().compose_node(parent, index)


class _NotYaml(UserError):
    """Text that is not valid YAML (``--set`` then takes it as a literal string)."""


def parse_yaml(text: str, source: str):
    """The value of the YAML document ``text``, parsed by the one bounded loader (:class:`_ConfigLoader`):
    no anchors or aliases, at most :data:`MAX_CONFIG_BYTES` of text. ``source`` (a file, or ``--set KEY``)
    begins every :class:`UserError`; invalid YAML is :class:`_NotYaml`, a subclass."""
    if len(text) > MAX_CONFIG_BYTES:
        raise UserError(f"{source}: larger than {MAX_CONFIG_BYTES} bytes, not a config")
    loader = _ConfigLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise _NotYaml(f"{source}: invalid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise UserError(f"{source}: YAML nested too deeply, not a config") from None
    except (ValueError, OverflowError) as e:  # e.g. an integer of more than 4300 digits
        raise UserError(f"{source}: invalid YAML value ({str(e).splitlines()[0][:200]})") from None
    finally:
        loader.dispose()


def load_yaml(path: Path, expect: type = dict):
    """The value of a YAML file the project reads (a config, ``config.amendments.yaml``): a regular file of
    UTF-8 text of at most :data:`MAX_CONFIG_BYTES`, without anchors or aliases (:func:`parse_yaml`), whose
    top level is ``expect`` (``dict`` or ``list``; an empty file is an empty one). Anything else is a
    :class:`UserError` naming the file."""
    from simsiam_kit.utils.io import open_regular

    path = Path(path)
    try:
        with open_regular(path, "a config") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes, not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not a UTF-8 text file (byte 0x{data[e.start]:02x} at offset {e.start}); a config is YAML text"
        ) from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = expect()
    if not isinstance(raw, expect):
        raise UserError(f"{path}: top level must be a {'mapping' if expect is dict else 'list'}")
    return raw


def load_config(cls, name_or_path: str | None, overrides: list[str] | None = None, group: str = "pretrain"):
    """Load a config by name (``configs/<group>/<name>.yaml``) or path, apply overrides, validate."""
    if name_or_path is None:
        raw, source = {}, "<defaults>"
    else:
        path = resolve_config_path(name_or_path, group)
        raw, source = load_yaml(path), str(path)
    if overrides:
        raw = merge_overrides(raw, overrides)
        source += " (with --set overrides)"
    cfg = _from_dict(cls, raw, source)
    validate(cfg, source)
    return cfg


def load_pretrain_config(name_or_path: str | None = "demo", overrides: list[str] | None = None) -> PretrainConfig:
    return load_config(PretrainConfig, name_or_path, overrides)


def _finite_floats(cfg, prefix: str = ""):
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        key = prefix + f.name
        if is_dataclass(v):
            yield from _finite_floats(v, key + ".")
        elif isinstance(v, float):
            yield key, v
        elif isinstance(v, tuple):
            yield from ((key, x) for x in v if isinstance(x, float))


#: a run name is one directory under ``runs/``: at most this many characters
MAX_RUN_NAME = 128


def check_run_name(name: str, source: str = "config") -> None:
    """A run name (``name``; the run is written to ``runs/<name>``) must be one plain directory name: not
    empty, no path separator, not ``.`` or ``..``, no control characters, at most :data:`MAX_RUN_NAME`
    characters. ``--set name=../../x`` would otherwise write the run outside ``runs/``."""
    bad = (
        not name
        or name.strip() != name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or len(name) > MAX_RUN_NAME
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    )
    if bad:
        raise UserError(
            f"{source}: bad value for 'name': {name!r} (expected a plain directory name: no '/' or '\\', "
            f"not '.' or '..', no surrounding spaces or control characters, at most {MAX_RUN_NAME} characters)"
        )


def validate(cfg, source: str) -> None:
    """Value ranges (the types are checked while building the dataclasses): one line naming the first
    bad key, its value and what is expected."""
    import math

    for key, value in _finite_floats(cfg):  # every config's floats (pretraining, detection)
        if not math.isfinite(value):
            raise UserError(f"{source}: bad value for '{key}': {value!r} (expected a finite number)")
    if not isinstance(cfg, PretrainConfig):
        return
    from simsiam_kit.image_settings import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

    check_run_name(cfg.name, source)
    d, m, o, t = cfg.data, cfg.model, cfg.optim, cfg.train
    jitter = d.color_jitter
    from simsiam_kit.models.backbones import BACKBONES  # the architectures and their stems (no torch)

    stems = tuple(BACKBONES[m.arch].stems) if m.arch in BACKBONES else ()
    checks = [
        (m.arch in BACKBONES, "model.arch", m.arch, f"one of {', '.join(BACKBONES)}"),
        (m.stem in stems, "model.stem", m.stem, " or ".join(stems)),
        (m.proj_layers in (2, 3), "model.proj_layers", m.proj_layers, "2 or 3"),
        (m.proj_dim >= 1, "model.proj_dim", m.proj_dim, ">= 1"),
        (m.proj_hidden >= 1, "model.proj_hidden", m.proj_hidden, ">= 1"),
        (m.pred_hidden >= 1, "model.pred_hidden", m.pred_hidden, ">= 1"),
        (o.epochs >= 1, "optim.epochs", o.epochs, ">= 1"),
        (o.batch_size >= 2, "optim.batch_size", o.batch_size, ">= 2"),
        (o.base_lr > 0, "optim.base_lr", o.base_lr, "> 0"),
        # the optimizer holds lr and weight decay as float32 scalars: larger values cannot even be set
        (
            o.base_lr * o.batch_size / 256 <= FLOAT32_MAX,
            "optim.base_lr",
            o.base_lr,
            f"base_lr x batch_size / 256 <= {FLOAT32_MAX:.3g}, the float32 range",
        ),
        (0 <= o.momentum < 1, "optim.momentum", o.momentum, "in [0, 1)"),
        (0 <= o.weight_decay <= FLOAT32_MAX, "optim.weight_decay", o.weight_decay, f">= 0 and <= {FLOAT32_MAX:.3g}"),
        (o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, ">= 0"),
        (o.schedule in ("cosine", "constant"), "optim.schedule", o.schedule, "cosine or constant"),
        (t.precision in PRECISIONS, "train.precision", t.precision, "auto, fp32, bf16 or fp16"),
        (0 <= t.seed <= 2**32 - 1, "train.seed", t.seed, "in [0, 2**32-1]"),
        (t.knn_k >= 1, "train.knn_k", t.knn_k, ">= 1"),
        (
            t.knn_temperature >= MIN_KNN_TEMPERATURE,
            "train.knn_temperature",
            t.knn_temperature,
            f">= {MIN_KNN_TEMPERATURE} (smaller values overflow the float32 vote)",
        ),
        (t.knn_every >= 0, "train.knn_every", t.knn_every, ">= 0 (0 = off)"),
        (t.knn_bank_limit >= 0, "train.knn_bank_limit", t.knn_bank_limit, ">= 0 (0 = all)"),
        (t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, ">= 1"),
        (t.log_every >= 0, "train.log_every", t.log_every, ">= 0"),
        (t.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", t.max_steps_per_epoch, ">= 0 (0 = full epochs)"),
        (t.collapse_warn_std >= 0, "train.collapse_warn_std", t.collapse_warn_std, ">= 0"),
        (
            0 < t.dist_timeout_s <= MAX_DIST_TIMEOUT_S,
            "train.dist_timeout_s",
            t.dist_timeout_s,
            f"> 0 and <= {MAX_DIST_TIMEOUT_S:.0f} seconds (30 days)",
        ),
        (
            MIN_IMAGE_SIZE <= d.image_size <= MAX_IMAGE_SIZE,
            "data.image_size",
            d.image_size,
            f"{MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels",
        ),
        (0 < d.crop_min_scale <= 1, "data.crop_min_scale", d.crop_min_scale, "in (0, 1]"),
        (d.workers is None or d.workers >= 0, "data.workers", d.workers, ">= 0 or null (auto)"),
        (0 <= d.flip_prob <= 1, "data.flip_prob", d.flip_prob, "a probability in [0, 1]"),
        (0 <= d.color_jitter_prob <= 1, "data.color_jitter_prob", d.color_jitter_prob, "a probability in [0, 1]"),
        (0 <= d.grayscale_prob <= 1, "data.grayscale_prob", d.grayscale_prob, "a probability in [0, 1]"),
        (0 <= d.blur_prob <= 1, "data.blur_prob", d.blur_prob, "a probability in [0, 1]"),
        (len(jitter) == 4, "data.color_jitter", list(jitter), "4 numbers: brightness, contrast, saturation, hue"),
        (
            len(jitter) != 4 or all(x >= 0 for x in jitter[:3]),
            "data.color_jitter",
            list(jitter),
            "brightness, contrast and saturation strengths >= 0",
        ),
        (len(jitter) != 4 or 0 <= jitter[3] <= 0.5, "data.color_jitter", list(jitter), "hue (4th number) in [0, 0.5]"),
        (
            len(d.blur_sigma) == 2 and 0 < d.blur_sigma[0] <= d.blur_sigma[1],
            "data.blur_sigma",
            list(d.blur_sigma),
            "2 numbers 0 < min <= max",
        ),
        (len(d.mean) == 3, "data.mean", list(d.mean), "3 numbers"),
        (len(d.std) == 3 and all(x > 0 for x in d.std), "data.std", list(d.std), "3 numbers > 0"),
    ]
    for ok, key, value, want in checks:
        if not ok:
            raise UserError(f"{source}: bad value for '{key}': {value!r} (expected {want})")


def save_config(cfg, path: Path) -> None:
    from simsiam_kit.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
