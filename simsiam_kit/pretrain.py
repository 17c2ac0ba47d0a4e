"""SimSiam pretraining, as build steps + the shared :class:`~simsiam_kit.engine.Trainer` + a summary.

* :func:`build_pretraining` turns a :class:`PretrainConfig` into everything a training loop needs (data,
  augmentation, model, optimizer, the step function): ``run_pretrain`` and the benchmarks call it, so a
  benchmark times exactly what ``simsiam-kit pretrain`` runs. It is made of :func:`build_data`,
  :func:`build_model` and :func:`build_optimizer`.
* :func:`build_hooks` lists the hooks; their order is the list's order (see each hook's ``priority``).
* :func:`run_pretrain` adds the run directory (:class:`~simsiam_kit.engine.run_dir.RunDir` owns its layout),
  checkpoints named objects in one call (:class:`~simsiam_kit.engine.checkpoint.Checkpointables`), trains,
  and writes ``results/pretrain.json`` and the plots.

What a run directory guarantees (docs/reliability.md): one process trains in it at a time (a lock);
a directory that holds something else is not overwritten unless asked; ``backbone.pt`` and
``checkpoints/last.pt`` are written atomically, backbone first, from finite weights only; a resumed run
takes the same steps as an uninterrupted one and keeps ``config.yaml`` as written (the changes
:data:`RESUME_MAY_CHANGE` allows are recorded in ``config.amendments.yaml``).

Where a change goes: a new augmentation op -> ``data/transforms.py``; a new backbone -> ``models/backbones.py``;
a new per-epoch measurement -> a hook in ``engine/hooks.py`` added in :func:`build_hooks`; a new config key ->
``config.py`` (one dataclass field, read where it is used).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from simsiam_kit.config import PretrainConfig, load_config, save_config, to_dict
from simsiam_kit.data import load_dataset
from simsiam_kit.data.datasets import ImageDataset, resize_in_memory
from simsiam_kit.data.loaders import make_loader, resolve_device_resident
from simsiam_kit.data.transforms import BatchAugment
from simsiam_kit.engine import Trainer
from simsiam_kit.engine.checkpoint import (
    Checkpointables,
    ModelState,
    RNGState,
    describe_nonfinite,
    load_file,
    nonfinite_tensors,
    save_backbone,
    save_checkpoint,
)
from simsiam_kit.engine.hooks import (
    Checkpointer,
    CollapseMonitor,
    EpochAverages,
    Hook,
    KNNMonitor,
    LRSchedule,
    MetricsWriter,
    ProgressBar,
    Throughput,
    read_metrics,
)
from simsiam_kit.engine.loggers import closing_all, log_images, make_sinks, png_to_array, view_pairs_grid
from simsiam_kit.engine.online_probe import OnlineProbe, OnlineProbeMonitor
from simsiam_kit.engine.run_dir import RunDir
from simsiam_kit.engine.step import OptimStep
from simsiam_kit.errors import TrainingDiverged, UserError
from simsiam_kit.features import FEATURE_BATCH, eval_resized, extract_features, feature_precision
from simsiam_kit.losses import output_std, simsiam_loss
from simsiam_kit.models import build_simsiam
from simsiam_kit.retrieval.knn import knn_classify
from simsiam_kit.utils import dist
from simsiam_kit.utils.device import (
    Precision,
    resolve_channels_last,
    resolve_compile,
    resolve_device,
    resolve_precision,
    resolve_workers,
    thread_settings,
)
from simsiam_kit.utils.io import atomic_write_json, atomic_write_text, defer_sigint
from simsiam_kit.utils.syncbn import convert_sync_batchnorm


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def build_optimizer(model, cfg: PretrainConfig, init_lr: float) -> torch.optim.Optimizer:
    """SGD as in the official code; on CUDA the fused kernel (one launch for all parameters)."""
    m = model.module if hasattr(model, "module") else model
    if cfg.optim.fix_pred_lr and m.has_predictor:
        groups = [
            {"params": list(m.backbone.parameters()) + list(m.projector.parameters()), "fix_lr": False},
            {"params": list(m.predictor.parameters()), "fix_lr": True},
        ]
    else:
        groups = [{"params": [p for p in m.parameters()], "fix_lr": False}]
    fused = next(m.parameters()).device.type == "cuda"
    return torch.optim.SGD(
        groups, lr=init_lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay, fused=fused or None
    )


class PretrainStep:
    """One SimSiam step: two augmented views, forward, symmetric loss, one :class:`OptimStep`.

    Nothing here waits for the device: on an accelerator a non-finite loss is recorded on the device and
    checked every ``check_every`` steps (and by :meth:`check` before a checkpoint is written), so the host
    can queue the next steps; on the CPU it is checked at every step, which costs nothing there.
    """

    def __init__(
        self,
        model,
        optimizer,
        augment,
        precision: Precision,
        device,
        channels_last: bool,
        gen: torch.Generator,
        cfg: PretrainConfig,
        check_every: int | None = None,
        probe: Optional[OnlineProbe] = None,
    ):
        self.model, self.augment, self.probe = model, augment, probe
        self.update = OptimStep(optimizer, precision)
        self.precision, self.device = precision, device
        self.channels_last, self.gen = channels_last, gen
        self.stop_gradient, self.symmetric = cfg.model.stop_gradient, cfg.loss.symmetric
        if check_every is None:
            check_every = 1 if torch.device(device).type == "cpu" else max(1, cfg.train.log_every)
        self.check_every = check_every
        self._nonfinite = None  # device bool: a non-finite loss since the last check

    def check(self, trainer) -> None:
        """Raise :class:`TrainingDiverged` if a loss since the last check was not finite (a host sync)."""
        bad, self._nonfinite = self._nonfinite, None
        if bad is not None and bool(bad):
            raise TrainingDiverged(
                f"loss became non-finite (nan or inf) at or before epoch {trainer.epoch + 1}, step "
                f"{trainer.global_step + 1}; training stopped, the last good checkpoint is kept "
                "(try a lower optim.base_lr or train.precision=fp32)"
            )

    def views(self, batch):
        imgs = batch["images"]
        if isinstance(imgs, tuple):  # crops already taken by the file loader's workers
            a, b = (t.to(self.device, non_blocking=True) for t in imgs)
            return self.augment(a, self.gen), self.augment(b, self.gen)
        x = imgs.to(self.device, non_blocking=True)
        return self.augment(x, self.gen), self.augment(x, self.gen)

    def __call__(self, batch, trainer):
        if batch["images"] is None:
            raise UserError("a whole batch of images was unreadable and skipped; check the dataset")
        x1, x2 = self.views(batch)
        if self.channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
            x2 = x2.contiguous(memory_format=torch.channels_last)
        with self.precision.autocast():
            if self.probe is not None:
                p1, p2, z1, z2, f1 = self.model(x1, x2, features=True)
            else:
                p1, p2, z1, z2 = self.model(x1, x2)
            loss = simsiam_loss(p1, p2, z1, z2, stop_gradient=self.stop_gradient, symmetric=self.symmetric)
        if self.check_every <= 1:
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {trainer.epoch + 1}, step {trainer.global_step + 1}; training "
                    "stopped, the last good checkpoint is kept (try a lower optim.base_lr or train.precision=fp32)"
                )
        else:
            bad = ~torch.isfinite(loss.detach())
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
            if (trainer.global_step + 1) % self.check_every == 0:
                self.check(trainer)
        self.update(loss)
        out = {"loss": loss.detach(), "std": output_std(z1), "images": x1.shape[0], "skipped": batch.get("skipped", 0)}
        if self.probe is not None:  # after SimSiam's update; detached features: no gradient reaches the backbone
            out.update(self.probe.step(f1, batch["labels"]))
        return out


@dataclass
class PretrainData:
    train: ImageDataset
    val: Optional[ImageDataset]  # labelled kNN-monitor queries, None when the monitor is off
    loader: object
    augment: BatchAugment
    device_resident: bool
    workers: int
    bank: Optional[ImageDataset] = None  # the kNN monitor's bank: the training images by the evaluation rule


def build_data(cfg: PretrainConfig, device: torch.device, dataset: Optional[ImageDataset] = None) -> PretrainData:
    """Training set (resized once when in memory), its loader (sharded per process, on the device when
    resident), the batched augmentation, and the kNN monitor's queries. ``dataset`` replaces
    ``cfg.data.train`` when the caller holds the images already (benchmarks)."""
    world = dist.get_world_size()
    if dataset is None:
        dataset = load_dataset(cfg.data.train, cfg.data.root, cfg.data.download, cfg.data.skip_bad_images)
    train = resize_in_memory(dataset, cfg.data.image_size)
    if cfg.optim.batch_size % world:
        raise UserError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by the {world} processes")
    resident = resolve_device_resident(cfg.data.device_resident, train, device)
    workers = resolve_workers(cfg.data.workers, device, dist.local_world_size())
    loader = make_loader(
        train,
        cfg.optim.batch_size // world,
        train=True,
        seed=cfg.train.seed,
        mode="two_view",
        image_size=cfg.data.image_size,
        workers=workers,
        crop_scale=(cfg.data.crop_min_scale, 1.0),
        flip_p=cfg.data.flip_prob,
        device=device if resident else None,
    )
    augment = BatchAugment(cfg.data, crop=not loader.two_views_in_loader)
    val = None
    if cfg.train.knn_every > 0 and cfg.data.val and train.has_labels:
        val = eval_resized(  # the kNN monitor's queries and bank: the evaluation rule, as eval knn takes them
            load_dataset(cfg.data.val, cfg.data.root, cfg.data.download, cfg.data.skip_bad_images), cfg.data.image_size
        )
        if not val.has_labels:
            val = None
    bank = eval_resized(dataset, cfg.data.image_size) if val is not None else None  # train itself at that size
    return PretrainData(train, val, loader, augment, resident, workers, bank)


def build_model(cfg: PretrainConfig, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """SimSiam (backbone + projector + predictor), SyncBN under DDP, on the device."""
    model = build_simsiam(cfg.model)
    if dist.is_dist() and cfg.train.sync_bn:
        model = convert_sync_batchnorm(model, device.type)
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@dataclass
class Pretraining:
    """Everything one SimSiam training loop needs, built from a config by :func:`build_pretraining`."""

    cfg: PretrainConfig
    device: torch.device
    precision: Precision
    channels_last: bool
    compiled: bool
    data: PretrainData
    model: torch.nn.Module  # the plain module (checkpoints, kNN monitor)
    net: torch.nn.Module  # what the step calls: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    init_lr: float
    aug_gen: torch.Generator
    step: PretrainStep


def build_pretraining(
    cfg: PretrainConfig, device: Optional[torch.device] = None, dataset: Optional[ImageDataset] = None
) -> Pretraining:
    """Everything for the loop; the model's initial weights come from torch's global RNG (seed it first)."""
    device = device or resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    channels_last = resolve_channels_last(cfg.train.channels_last, device, precision)
    compiled = resolve_compile(cfg.train.compile, device)
    data = build_data(cfg, device, dataset)
    model = build_model(cfg, device, channels_last)
    init_lr = cfg.optim.base_lr * cfg.optim.batch_size / 256
    optimizer = build_optimizer(model, cfg, init_lr)
    # augmentation draws its parameters where it runs: a CUDA generator keeps the step free of host syncs
    aug_gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    aug_gen.manual_seed(cfg.train.seed * 1000 + dist.get_rank())
    net = model
    if dist.is_dist():
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if compiled:
        net = torch.compile(net)  # shares the parameters; checkpoints save the plain module
        if device.type == "cuda":
            data.augment.compile()
    probe = None
    if resolve_online_probe(cfg.train.online_probe, data):
        probe = OnlineProbe(
            model.backbone.feature_dim, max(data.train.num_classes, data.val.num_classes), device, cfg.optim.batch_size
        )
    step = PretrainStep(net, optimizer, data.augment, precision, device, channels_last, aug_gen, cfg, probe=probe)
    return Pretraining(
        cfg, device, precision, channels_last, compiled, data, model, net, optimizer, init_lr, aug_gen, step
    )


def resolve_online_probe(flag: Optional[bool], data: PretrainData) -> bool:
    """``train.online_probe``: needs labelled training images and a labelled val set; auto = on for in-memory
    data (CIFAR-sized runs), off for file datasets (simsiam_kit/engine/online_probe.py)."""
    possible = data.val is not None and data.train.has_labels
    if flag and not possible:
        raise UserError(
            "train.online_probe=true needs labelled training images and a labelled data.val (with train.knn_every > 0)"
        )
    return possible and (bool(flag) if flag is not None else data.train.in_memory)


def build_hooks(
    p: Pretraining,
    run: RunDir,
    save: Callable,
    knn_eval: Optional[Callable],
    log: Callable[[str], None],
    sinks: Sequence = (),
) -> list[Hook]:
    cfg = p.cfg
    writer = MetricsWriter(run.metrics, cfg.train.log_every, sinks)
    hooks: list[Hook] = [
        LRSchedule(
            p.optimizer, p.init_lr, cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.schedule, cfg.optim.lr_per_step
        ),
        Throughput(),
        EpochAverages(),
        CollapseMonitor(cfg.model.proj_dim, cfg.train.collapse_warn_std, log),
        Checkpointer(save, cfg.train.checkpoint_every),
        ProgressBar(cfg.train.progress, desc=f"pretrain {cfg.name}"),
        writer,
    ]
    if knn_eval is not None:  # its epoch-0 line (initial weights) is written like every epoch line
        hooks.append(KNNMonitor(knn_eval, cfg.train.knn_every, record=writer.write, log=log))
    if p.step.probe is not None:
        hooks.append(OnlineProbeMonitor(make_probe_eval(p, batch_size=min(512, max(64, cfg.optim.batch_size)))))
    return hooks


def make_probe_eval(p: Pretraining, batch_size: int) -> Callable[[], float]:
    """Val top-1 of the online probe: raw (not l2-normalised) backbone features in eval mode, as the
    offline linear probe sees them."""

    def probe_eval() -> float:
        cfg = p.cfg
        f, y, _ = extract_features(
            p.model.backbone,
            p.data.val,
            device=p.device,
            batch_size=batch_size,
            precision=feature_precision("auto", p.device),
            mean=cfg.data.mean,
            std=cfg.data.std,
            image_size=cfg.data.image_size,
            workers=p.data.workers,
            channels_last=p.channels_last,
            normalize=False,
            out_device=p.device,
        )
        return p.step.probe.top1(f, y)

    return probe_eval


def default_run_dir(cfg: PretrainConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def find_latest_run(name: str) -> Optional[Path]:
    runs = sorted(Path("runs").glob(f"{name}-*"), key=lambda p: p.stat().st_mtime) if Path("runs").is_dir() else []
    runs = [r for r in runs if RunDir(r).has_checkpoint()]
    return runs[-1] if runs else None


#: config keys ``--resume --set`` may change: they do not alter the weights a run computes (optim.epochs
#: extends the run; the others are logging, monitoring, the DDP timeout, and the loader's worker count,
#: which the crops do not depend on). Changes are recorded in ``config.amendments.yaml``; ``config.yaml``
#: stays as first written.
RESUME_MAY_CHANGE = (
    "optim.epochs",
    "train.progress",
    "train.log_every",
    "train.plots",
    "train.collapse_warn_std",
    "train.knn_every",
    "train.dist_timeout_s",
    "data.workers",
    "log.tensorboard",
    "log.wandb",
    "log.wandb_project",
    "log.view_pairs",
)


def read_amendments(run: RunDir) -> list[dict]:
    if not run.amendments.is_file():
        return []
    import yaml

    try:
        entries = yaml.safe_load(run.amendments.read_text()) or []
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{run.amendments}: not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("set"), dict) for e in entries
    ):
        raise UserError(f"{run.amendments}: expected a list of {{after_epoch, set: {{key: value}}}} entries")
    return entries


def load_run_config(run_dir: Path, overrides: list[str] | None) -> PretrainConfig:
    """A run's config: ``config.yaml``, then its recorded amendments, then ``overrides``."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise UserError(f"{run_dir}: no config.yaml, not a simsiam-kit run directory")
    amended = [f"{k}={json.dumps(v)}" for e in read_amendments(run) for k, v in e["set"].items()]
    return load_config(PretrainConfig, str(run.config), amended + list(overrides or []))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(cfg: PretrainConfig, saved: dict, source: str) -> dict:
    """Keys whose value ``cfg`` changes against the config a checkpoint was written with, as
    ``{key: new value}``; a :class:`UserError` when one of them is not in :data:`RESUME_MAY_CHANGE`."""
    old, new = _flat(saved or {}), _flat(to_dict(cfg))
    changed = {k: v for k, v in new.items() if k in old and old[k] != v}
    for k, v in changed.items():
        if k not in RESUME_MAY_CHANGE:
            raise UserError(
                f"{source}: resuming would change '{k}' from {old[k]!r} to {v!r}; a resumed run keeps its "
                f"config (only {', '.join(RESUME_MAY_CHANGE)} may change): start a new run instead"
            )
    return changed


def _trim_metrics(path: Path, completed_epochs: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
    recs = read_metrics(path)
    keep = [
        r
        for r in recs
        if (r.get("type") == "epoch" and r["epoch"] <= completed_epochs)
        or (r.get("type") != "epoch" and r.get("epoch", 0) < completed_epochs)
    ]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def make_knn_eval(p: Pretraining, batch_size: int = FEATURE_BATCH) -> Optional[Callable]:
    """The kNN monitor's evaluation: features of the (first ``knn_bank_limit``) training images as the bank,
    the val set as queries, weighted kNN on the training device. None when the monitor is off.

    Features follow the one extraction rule of ``simsiam_kit/features.py`` (fp32, contiguous, whatever the
    training precision and memory format), so ``eval knn`` on the same weights and data gives the same number."""
    cfg, data = p.cfg, p.data
    if data.val is None:
        return None
    precision = feature_precision("auto", p.device)

    def knn_eval(backbone=None) -> float:
        bb = backbone if backbone is not None else p.model.backbone
        if p.channels_last:  # a contiguous copy: channels_last weights would change the convolution kernels
            import copy

            bb = copy.deepcopy(bb).to(memory_format=torch.contiguous_format)
        bank = data.bank if data.bank is not None else data.train
        if cfg.train.knn_bank_limit and len(bank) > cfg.train.knn_bank_limit:
            bank = bank.subset(slice(0, cfg.train.knn_bank_limit))
        kw = dict(
            device=p.device,
            batch_size=batch_size,
            precision=precision,
            mean=cfg.data.mean,
            std=cfg.data.std,
            image_size=cfg.data.image_size,
            workers=data.workers,
            out_device=p.device,
        )  # features stay on the device: the search runs there too
        fb, lb, _ = extract_features(bb, bank, **kw)
        fq, lq, _ = extract_features(bb, data.val, **kw)
        pred, _ = knn_classify(
            fb,
            lb,
            fq,
            k=min(cfg.train.knn_k, len(fb)),
            temperature=cfg.train.knn_temperature,
            num_classes=max(data.train.num_classes, data.val.num_classes),
        )
        return 100.0 * (pred == lq.to(pred.device)).float().mean().item()

    return knn_eval


def _on_main(fn: Callable, *args):
    """Run ``fn`` on rank 0; every rank returns its result or raises its :class:`UserError`."""
    outcome = None
    if dist.is_main():
        try:
            outcome = ("ok", fn(*args))
        except UserError as e:
            outcome = ("error", str(e))
    outcome = dist.broadcast_object(outcome)
    if outcome[0] == "error":
        raise UserError(outcome[1])
    return outcome[1]


def prepare_run_dir(run: RunDir, resume: bool, overwrite: bool, log: Callable[[str], None]) -> None:
    """Lock the run directory for this process and check that it may be used (rank 0)."""
    run.lock()
    if resume:
        if not run.has_checkpoint():
            raise UserError(f"--resume: no checkpoint at {run.checkpoint}")
    elif not run.is_empty():
        if not overwrite:
            if run.has_checkpoint():
                raise UserError(
                    f"{run} already holds a run; resume it (--resume), replace it (--overwrite) "
                    "or pick another output directory"
                )
            raise UserError(
                f"{run} is not empty and holds no checkpoint to resume; replace its run files "
                "(--overwrite) or pick another output directory"
            )
        run.remove_run_files()
    n, size = run.remove_stale_temp_files()
    if n:
        log(f"removed {n} temp file{'s' if n > 1 else ''} ({size / 1e6:.1f} MB) left by interrupted writes in {run}")


def _load_checkpoint(run: RunDir) -> dict:
    if not run.has_checkpoint():
        raise UserError(f"--resume: no checkpoint at {run.checkpoint}")
    ckpt = load_file(run.checkpoint)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "simsiam-kit-checkpoint":
        raise UserError(f"{run.checkpoint}: not a simsiam-kit checkpoint")
    bad, total = nonfinite_tensors(ckpt.get("model"))
    if bad:
        raise UserError(
            f"{run.checkpoint}: non-finite weights, {describe_nonfinite(bad, total)}; cannot resume from them"
        )
    return ckpt


def _epoch_line_missing(run: RunDir, epoch: int) -> bool:
    lines = read_metrics(run.metrics)
    return epoch > 0 and not any(r.get("type") == "epoch" and r.get("epoch") == epoch for r in lines)


def run_pretrain(
    cfg: PretrainConfig,
    output: Optional[Path] = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict:
    """Train SimSiam; return the summary written to ``results/pretrain.json``.

    ``output``: the run directory (default ``runs/<name>-<time>``); it is locked for this process.
    ``resume``: continue from its ``checkpoints/last.pt``. ``overwrite``: replace the run files of a
    directory that is not empty (without it such a directory is refused)."""
    if resume and overwrite:
        raise UserError(
            "resume and overwrite exclude each other: resuming continues the run in the directory, "
            "overwriting replaces it"
        )
    device = resolve_device(cfg.train.device)
    dist.init_from_env(device.type, cfg.train.dist_timeout_s)
    if device.type == "cuda" and dist.is_dist():
        device = torch.device("cuda", dist.local_rank())
    run = RunDir(output if output is not None else default_run_dir(cfg))
    try:
        _on_main(prepare_run_dir, run, resume, overwrite, log)
        return _train(cfg, run, resume, device, log)
    finally:
        run.unlock()


def _train(cfg: PretrainConfig, run: RunDir, resume: bool, device: torch.device, log: Callable[[str], None]) -> dict:
    ckpt = _load_checkpoint(run) if resume else None
    amendment = resume_changes(cfg, ckpt.get("config"), f"{run.checkpoint}") if ckpt is not None else {}
    seed_everything(cfg.train.seed + dist.get_rank(), cfg.train.deterministic)
    p = build_pretraining(cfg, device)
    objects = Checkpointables(
        model=ModelState(p.model),
        optimizer=p.optimizer,
        scaler=p.step.update.scaler,
        rng=RNGState(p.aug_gen),
        probe=p.step.probe,
    )

    def save(trainer) -> None:
        p.step.check(trainer)  # never write weights from a step whose loss was not finite
        state = objects.state_dict()  # collective under DDP (RNG states of every rank)
        bad, total = nonfinite_tensors(state)
        if dist.any_rank(bool(bad)):  # never write non-finite weights (an update can diverge with a finite loss)
            raise TrainingDiverged(
                f"weights became non-finite in epoch {trainer.epoch} (step {trainer.global_step}): "
                f"{describe_nonfinite(bad, total) if bad else 'on another process'}; training stopped, the last good "
                "checkpoint is kept (try a lower optim.base_lr or optim.weight_decay, or train.precision=fp32)"
            )
        if not dist.is_main():
            return
        gen = {"epoch": trainer.epoch, "global_step": trainer.global_step}
        with defer_sigint():  # Ctrl-C waits for the pair; the backbone goes first, so it is never the older one
            save_backbone(
                run.backbone,
                p.model.backbone,
                cfg.model.arch,
                cfg.model.stem,
                {"image_size": cfg.data.image_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std), **gen},
            )
            save_checkpoint(
                run.checkpoint,
                **state,
                trainer=trainer.state_dict(),
                **gen,
                config=to_dict(cfg),
                metrics=trainer.epoch_metrics,
            )

    knn_eval = make_knn_eval(p)
    sinks = (
        make_sinks(run.root, cfg.log.tensorboard, cfg.log.wandb, cfg.log.wandb_project, run.root.name, to_dict(cfg))
        if dist.is_main()
        else []
    )  # TensorBoard / W&B: rank 0 writes
    trainer = Trainer(
        p.step,
        p.data.loader,
        cfg.optim.epochs,
        build_hooks(p, run, save, knn_eval, log, sinks),
        max_steps_per_epoch=cfg.train.max_steps_per_epoch,
    )
    with closing_all(sinks):  # flushed and closed however the run ends
        world = dist.get_world_size()
        finishing = False  # resuming a run killed after its last checkpoint: only its summary is left to write
        if ckpt is not None:
            objects.load_state_dict(ckpt, source=str(run.checkpoint))
            trainer.load_state_dict(ckpt.get("trainer") or ckpt)  # version-1 checkpoints keep epoch/global_step on top
            if trainer.start_epoch >= cfg.optim.epochs:
                if (run.results / "pretrain.json").is_file():
                    raise UserError(
                        f"{run.checkpoint}: run already finished ({trainer.start_epoch}/{cfg.optim.epochs} "
                        "epochs); raise optim.epochs with --set to train longer"
                    )
                finishing = True

        def write_start() -> bool:
            run.checkpoints.mkdir(parents=True, exist_ok=True)
            if ckpt is None:
                save_config(cfg, run.config)
                atomic_write_text(run.metrics, "")
                return False
            if amendment and run.config.is_file():
                recorded = _flat(to_dict(load_run_config(run.root, None)))  # config.yaml + earlier amendments
                new = {k: v for k, v in amendment.items() if recorded.get(k) != v}
                if new:
                    import yaml

                    entries = read_amendments(run) + [{"after_epoch": trainer.start_epoch, "set": new}]
                    atomic_write_text(run.amendments, yaml.safe_dump(entries, sort_keys=False))
            _trim_metrics(run.metrics, trainer.start_epoch)
            return _epoch_line_missing(run, trainer.start_epoch)

        unfinished_epoch = _on_main(write_start)
        dist.barrier()

        if dist.is_main():
            data = p.data
            log(f"run directory: {run}")
            log(
                f"device {device} ({world} process{'es' if world > 1 else ''}), precision {p.precision.name}, "
                f"channels_last {p.channels_last}, compile {p.compiled}, data on device {data.device_resident}"
                + ("" if data.train.in_memory else f", {data.workers} loader workers")
                + "; "
                f"{len(data.train)} train images, batch {cfg.optim.batch_size}, "
                f"lr {p.init_lr:g}, {trainer.steps_per_epoch} steps/epoch"
                + (f"; resuming after epoch {trainer.start_epoch}" if ckpt is not None else "")
                + (f" (amended: {', '.join(f'{k}={v}' for k, v in amendment.items())})" if amendment else "")
            )
            for line in start_notes(cfg, p.device):
                log(line)
        if unfinished_epoch:  # killed after the checkpoint, before the epoch's monitor and metrics line
            trainer.finish_epoch(ckpt.get("metrics") or {}, after=Checkpointer)
        if sinks and cfg.log.view_pairs > 0 and p.data.train.in_memory and ckpt is None:
            grid = view_pairs_grid(
                p.data.train.images,
                BatchAugment(cfg.data, masked=False),
                cfg.data.mean,
                cfg.data.std,
                n=min(cfg.log.view_pairs, len(p.data.train)),
                seed=cfg.train.seed,
            )
            log_images(sinks, {"views/image_view1_view2": grid})
        t0 = time.time()
        if not finishing:
            trainer.train()
        elapsed = time.time() - t0
        summary = summarise(p, run, elapsed, knn_eval) if dist.is_main() else {}
        if sinks and run.plots.is_dir():  # the final plots, next to the scalars
            log_images(
                sinks,
                {f"plots/{f.stem}": png_to_array(f) for f in sorted(run.plots.glob("*.png"))},
                step=trainer.global_step,
            )
        dist.barrier()
        return summary


def start_notes(cfg: PretrainConfig, device: torch.device) -> list[str]:
    """Lines printed when a run starts: the image settings and CPU threads in force, and warnings for a busy
    machine and for the demo's MNIST settings applied to other data."""
    th = thread_settings()
    lines = [
        f"images {cfg.data.image_size} px, mean {list(cfg.data.mean)}, std {list(cfg.data.std)}; "
        f"{th['threads']} CPU thread{'s' if th['threads'] != 1 else ''} ({th['chosen_by']}"
        + (
            f", load average {th['load_average']:g} on {th['usable_cores']} usable cores"
            if th.get("load_average") is not None
            else ""
        )
        + ")"
    ]
    if device.type == "cpu" and th.get("busy"):
        lines.append(
            f"warning: load average {th['load_average']:g} on {th['usable_cores']} usable cores: other "
            "processes keep the CPU busy, so this run is slower than the README's figures"
            + (
                ""
                if th["threads"] == 1 or th["chosen_by"] != "OMP_NUM_THREADS"
                else f"; {th['threads']} threads (OMP_NUM_THREADS) spin against them, 1 is usually much faster"
            )
        )
    demo = load_config(PretrainConfig, "demo").data
    if not str(cfg.data.train).startswith("demo") and (
        cfg.data.image_size,
        tuple(cfg.data.mean),
        tuple(cfg.data.std),
    ) == (demo.image_size, tuple(demo.mean), tuple(demo.std)):
        lines.append(
            f"warning: data.train is {cfg.data.train}, but the demo's MNIST settings are in force "
            f"({demo.image_size} px, mean {list(demo.mean)}, std {list(demo.std)}); set data.image_size, "
            "data.mean and data.std for these images, or start from --config cifar10_resnet18"
        )
    return lines


def summarise(p: Pretraining, run: RunDir, elapsed: float, knn_eval: Optional[Callable]) -> dict:
    """``results/pretrain.json`` (last epoch's loss, std, throughput; kNN against a random-init backbone of
    the same architecture, seed and image settings) and the plots."""
    cfg = p.cfg
    recs = [r for r in read_metrics(run.metrics) if r.get("type") == "epoch"]
    last = recs[-1] if recs else {}
    summary = {
        "run_dir": str(run),
        "epochs": cfg.optim.epochs,
        "final_loss": last.get("loss"),
        "final_std": last.get("std"),
        "std_x_sqrt_d": last.get("std_x_sqrt_d"),
        "images_per_s": last.get("images_per_s"),
        "train_seconds": round(elapsed, 1),
        "precision": p.precision.name,
        "channels_last": p.channels_last,
        "compile": p.compiled,
        "device_resident": p.data.device_resident,
        "loader_workers": 0 if p.data.train.in_memory else p.data.workers,
        "device": str(p.device),
        "world_size": dist.get_world_size(),
        "threads": thread_settings(),
        "image_size": cfg.data.image_size,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
    }
    if knn_eval is not None:
        summary["knn_top1"] = last.get("knn_top1")
        # the random-init row is the run's own epoch-0 point (its initial weights, scored before training by the
        # kNN monitor); a run that has none (started by an older version) scores the same weights now
        initial = next((r["knn_top1"] for r in recs if r.get("epoch") == 0 and r.get("knn_top1") is not None), None)
        if initial is None:
            from simsiam_kit.weights import random_backbone

            initial = knn_eval(
                random_backbone(cfg.model.arch, cfg.model.stem, cfg.model.zero_init_residual, cfg.train.seed).to(
                    p.device
                )
            )
        summary["knn_top1_random_init"] = initial
        summary["knn"] = {
            "k": cfg.train.knn_k,
            "temperature": cfg.train.knn_temperature,
            "bank": cfg.data.train,
            "queries": cfg.data.val,
            "precision": feature_precision("auto", p.device).name,
            "random_init": f"the run's initial weights (epoch 0, seed {cfg.train.seed})",
        }
    atomic_write_json(run.results / "pretrain.json", summary)
    if cfg.train.plots:
        from simsiam_kit.plots import plot_pretrain_metrics

        plot_pretrain_metrics(
            run.metrics, run.plots, dim=cfg.model.proj_dim, baseline=summary.get("knn_top1_random_init")
        )
    return summary
