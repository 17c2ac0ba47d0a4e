"""SimSiam pretraining: builds data, model, optimizer and hooks from a :class:`PretrainConfig` and runs
the shared :class:`~simsiam_kit.engine.Trainer`.

Run directory layout::

    RUN/config.yaml            resolved config (never changed during the run)
    RUN/checkpoints/last.pt    full checkpoint (model, optimizer, schedule, scaler, epoch, RNG states)
    RUN/backbone.pt            backbone state dict (no prefixes) + arch/stem/normalisation metadata
    RUN/metrics.jsonl          one JSON object per line (step and epoch records)
    RUN/plots/*.png            loss, std, kNN accuracy, lr
    RUN/results/pretrain.json  final summary (loss, std, kNN top-1 vs random init, throughput)
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from simsiam_kit.config import PretrainConfig, load_config, save_config, to_dict
from simsiam_kit.data import load_dataset
from simsiam_kit.data.datasets import resize_in_memory
from simsiam_kit.data.loaders import make_loader, resolve_device_resident
from simsiam_kit.data.transforms import BatchAugment
from simsiam_kit.engine import Trainer
from simsiam_kit.engine.checkpoint import (
    clean_state_dict, get_rng_state, load_file, save_backbone, save_checkpoint, set_rng_state, unwrap,
)
from simsiam_kit.engine.hooks import (
    Checkpointer, CollapseMonitor, EpochAverages, KNNMonitor, LRSchedule, MetricsWriter, ProgressBar, Throughput,
    read_metrics,
)
from simsiam_kit.errors import TrainingDiverged, UserError
from simsiam_kit.features import extract_features
from simsiam_kit.knn import knn_classify
from simsiam_kit.losses import output_std, simsiam_loss
from simsiam_kit.models import build_backbone, build_simsiam
from simsiam_kit.utils import dist
from simsiam_kit.utils.device import (
    resolve_channels_last, resolve_compile, resolve_device, resolve_precision, resolve_workers,
)
from simsiam_kit.utils.io import atomic_write_json, atomic_write_text
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
    m = unwrap(model)
    if cfg.optim.fix_pred_lr and m.has_predictor:
        groups = [
            {"params": list(m.backbone.parameters()) + list(m.projector.parameters()), "fix_lr": False},
            {"params": list(m.predictor.parameters()), "fix_lr": True},
        ]
    else:
        groups = [{"params": [p for p in m.parameters()], "fix_lr": False}]
    fused = next(m.parameters()).device.type == "cuda"
    return torch.optim.SGD(groups, lr=init_lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                           fused=fused or None)


class PretrainStep:
    """One SimSiam step: two augmented views, forward, symmetric loss, backward, SGD step.

    Nothing here waits for the device: on an accelerator a non-finite loss is recorded on the device and
    checked every ``check_every`` steps (and by :meth:`check` before a checkpoint is written), so the host
    can queue the next steps; on the CPU it is checked at every step, which costs nothing there.
    """

    def __init__(self, model, optimizer, augment, precision, scaler, device, channels_last, gen, cfg,
                 check_every: int | None = None):
        self.model, self.opt, self.augment = model, optimizer, augment
        self.precision, self.scaler, self.device = precision, scaler, device
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
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        return {"loss": loss.detach(), "std": output_std(z1), "images": x1.shape[0],
                "skipped": batch.get("skipped", 0)}


def default_run_dir(cfg: PretrainConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def find_latest_run(name: str) -> Optional[Path]:
    runs = sorted(Path("runs").glob(f"{name}-*"), key=lambda p: p.stat().st_mtime) if Path("runs").is_dir() else []
    runs = [r for r in runs if (r / "checkpoints" / "last.pt").is_file()]
    return runs[-1] if runs else None


def load_run_config(run_dir: Path, overrides: list[str] | None) -> PretrainConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: no config.yaml, not a simsiam-kit run directory")
    return load_config(PretrainConfig, str(path), overrides)


def _trim_metrics(path: Path, completed_epochs: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
    recs = read_metrics(path)
    keep = [r for r in recs if (r.get("type") == "epoch" and r["epoch"] <= completed_epochs)
            or (r.get("type") != "epoch" and r.get("epoch", 0) < completed_epochs)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def run_pretrain(
    cfg: PretrainConfig,
    output: Optional[Path] = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train SimSiam; return the summary written to ``results/pretrain.json``."""
    device = resolve_device(cfg.train.device)
    dist.init_from_env(device.type)
    if device.type == "cuda" and dist.is_dist():
        device = torch.device("cuda", dist.local_rank())
    precision = resolve_precision(cfg.train.precision, device)
    channels_last = resolve_channels_last(cfg.train.channels_last, device, precision)
    world = dist.get_world_size()
    run_dir = Path(output) if output is not None else default_run_dir(cfg)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise UserError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = load_file(ckpt_path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != "simsiam-kit-checkpoint":
            raise UserError(f"{ckpt_path}: not a simsiam-kit checkpoint")

    seed_everything(cfg.train.seed + dist.get_rank(), cfg.train.deterministic)

    # ---- data
    train_ds = load_dataset(cfg.data.train, cfg.data.root, cfg.data.download, cfg.data.skip_bad_images)
    train_ds = resize_in_memory(train_ds, cfg.data.image_size)
    if cfg.optim.batch_size % world:
        raise UserError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by the {world} processes")
    per_rank_bs = cfg.optim.batch_size // world
    resident = resolve_device_resident(cfg.data.device_resident, train_ds, device)
    workers = resolve_workers(cfg.data.workers, device, dist.local_world_size())
    loader = make_loader(train_ds, per_rank_bs, train=True, seed=cfg.train.seed, mode="two_view",
                         image_size=cfg.data.image_size, workers=workers,
                         crop_scale=(cfg.data.crop_min_scale, 1.0), flip_p=cfg.data.flip_prob,
                         device=device if resident else None)
    augment = BatchAugment(cfg.data, crop=not loader.two_views_in_loader)
    compiled = resolve_compile(cfg.train.compile, device)
    val_ds = None
    if cfg.train.knn_every > 0 and cfg.data.val and train_ds.has_labels:
        val_ds = resize_in_memory(
            load_dataset(cfg.data.val, cfg.data.root, cfg.data.download, cfg.data.skip_bad_images), cfg.data.image_size)
        if not val_ds.has_labels:
            val_ds = None

    # ---- model
    model = build_simsiam(cfg.model)
    if dist.is_dist() and cfg.train.sync_bn:
        model = convert_sync_batchnorm(model, device.type)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    init_lr = cfg.optim.base_lr * cfg.optim.batch_size / 256
    optimizer = build_optimizer(model, cfg, init_lr)
    scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
    # augmentation draws its parameters where it runs: a CUDA generator keeps the step free of host syncs
    aug_gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    aug_gen.manual_seed(cfg.train.seed * 1000 + dist.get_rank())
    start_epoch, global_step = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        rng = ckpt["rng"]
        set_rng_state(rng[dist.get_rank()] if isinstance(rng, list) else rng, aug_gen)
        if start_epoch >= cfg.optim.epochs:
            raise UserError(f"{ckpt_path}: run already finished ({start_epoch}/{cfg.optim.epochs} epochs); "
                            "raise optim.epochs with --set to train longer")
    ddp_model = model
    if dist.is_dist():
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if compiled:
        ddp_model = torch.compile(ddp_model)  # shares the parameters; checkpoints save the plain module
        if device.type == "cuda":
            augment.compile()

    # ---- run directory
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        if ckpt is None:
            if ckpt_path.exists():
                raise UserError(f"{run_dir} already holds a run; use --resume to continue it or pick another --output")
            save_config(cfg, run_dir / "config.yaml")
            (run_dir / "metrics.jsonl").write_text("")
        else:
            save_config(cfg, run_dir / "config.yaml")
            _trim_metrics(run_dir / "metrics.jsonl", start_epoch)
    dist.barrier()

    backbone = model.backbone
    bs_eval = min(512, max(64, per_rank_bs))

    def knn_eval(bb=None) -> float:
        bb = bb if bb is not None else backbone
        bank = train_ds
        if cfg.train.knn_bank_limit and len(bank) > cfg.train.knn_bank_limit:
            bank = bank.subset(slice(0, cfg.train.knn_bank_limit))
        kw = dict(device=device, batch_size=bs_eval, precision=precision, mean=cfg.data.mean, std=cfg.data.std,
                  image_size=cfg.data.image_size, workers=workers, channels_last=channels_last,
                  out_device=device)  # features stay on the device: the search runs there too
        fb, lb, _ = extract_features(bb, bank, **kw)
        fq, lq, _ = extract_features(bb, val_ds, **kw)
        pred, _ = knn_classify(fb, lb, fq, k=min(cfg.train.knn_k, len(fb)), temperature=cfg.train.knn_temperature,
                               num_classes=max(train_ds.num_classes, val_ds.num_classes))
        return 100.0 * (pred == lq.to(pred.device)).float().mean().item()

    def save(trainer) -> None:
        step.check(trainer)  # never write weights from a step whose loss was not finite
        rng = _gather_rng(aug_gen)
        if not dist.is_main():
            return
        save_checkpoint(
            ckpt_path,
            epoch=trainer.epoch, global_step=trainer.global_step,
            model=clean_state_dict(model.state_dict()),
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            schedule={"epoch": trainer.epoch, "global_step": trainer.global_step, "init_lr": init_lr},
            rng=rng,
            config=to_dict(cfg),
            metrics=trainer.epoch_metrics,
        )
        save_backbone(run_dir / "backbone.pt", model.backbone, cfg.model.arch, cfg.model.stem,
                      {"image_size": cfg.data.image_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                       "epoch": trainer.epoch})

    hooks = [
        LRSchedule(optimizer, init_lr, cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.schedule,
                   cfg.optim.lr_per_step),
        Throughput(), EpochAverages(),
        CollapseMonitor(cfg.model.proj_dim, cfg.train.collapse_warn_std, log),
        Checkpointer(save, cfg.train.checkpoint_every),
        ProgressBar(cfg.train.progress, desc=f"pretrain {cfg.name}"),
        MetricsWriter(run_dir / "metrics.jsonl", cfg.train.log_every),
    ]
    if val_ds is not None:
        hooks.append(KNNMonitor(knn_eval, cfg.train.knn_every))
    step = PretrainStep(ddp_model, optimizer, augment, precision, scaler, device, channels_last, aug_gen, cfg)
    trainer = Trainer(step, loader, cfg.optim.epochs, hooks, start_epoch=start_epoch, global_step=global_step,
                      max_steps_per_epoch=cfg.train.max_steps_per_epoch)
    if dist.is_main():
        log(f"run directory: {run_dir}")
        log(f"device {device} ({world} process{'es' if world > 1 else ''}), precision {precision.name}, "
            f"channels_last {channels_last}, compile {compiled}, data on device {resident}"
            + ("" if train_ds.in_memory else f", {workers} loader workers") + "; "
            f"{len(train_ds)} train images, batch {cfg.optim.batch_size}, "
            f"lr {init_lr:g}, {trainer.steps_per_epoch} steps/epoch"
            + (f"; resuming after epoch {start_epoch}" if ckpt is not None else ""))
    t0 = time.time()
    trainer.train()
    elapsed = time.time() - t0

    summary: dict = {}
    if dist.is_main():
        recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("type") == "epoch"]
        last = recs[-1] if recs else {}
        summary = {
            "run_dir": str(run_dir), "epochs": cfg.optim.epochs, "final_loss": last.get("loss"),
            "final_std": last.get("std"), "std_x_sqrt_d": last.get("std_x_sqrt_d"),
            "images_per_s": last.get("images_per_s"), "train_seconds": round(elapsed, 1),
            "precision": precision.name, "channels_last": channels_last, "compile": compiled,
            "device_resident": resident, "loader_workers": 0 if train_ds.in_memory else workers,
            "device": str(device), "world_size": world,
        }
        if val_ds is not None:
            summary["knn_top1"] = last.get("knn_top1")
            torch.manual_seed(cfg.train.seed)
            rand_bb = build_backbone(cfg.model.arch, cfg.model.stem, cfg.model.zero_init_residual).to(
                device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            summary["knn_top1_random_init"] = knn_eval(rand_bb)
            summary["knn"] = {"k": cfg.train.knn_k, "temperature": cfg.train.knn_temperature,
                              "bank": cfg.data.train, "queries": cfg.data.val}
        atomic_write_json(run_dir / "results" / "pretrain.json", summary)
        if cfg.train.plots:
            from simsiam_kit.plots import plot_pretrain_metrics

            plot_pretrain_metrics(run_dir / "metrics.jsonl", run_dir / "plots", dim=cfg.model.proj_dim)
    dist.barrier()
    return summary


def _gather_rng(aug_gen):
    state = get_rng_state(aug_gen)
    if not dist.is_dist():
        return state
    # every rank's RNG state, so a resumed multi-process run continues each rank's streams
    import torch.distributed as tdist

    states = [None] * dist.get_world_size()
    tdist.all_gather_object(states, state)
    return states
