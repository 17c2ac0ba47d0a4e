"""What a pretraining run says about itself: the lines printed when it starts (:func:`start_lines`,
:func:`start_notes`) and the summary written at the end (:func:`summarise`: ``results/pretrain.json``
and the plots)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from simsiam_kit.config import PretrainConfig, load_config
from simsiam_kit.engine.hooks import read_metrics
from simsiam_kit.engine.loggers import tensorboard_note
from simsiam_kit.engine.run_dir import RunDir
from simsiam_kit.features import feature_precision
from simsiam_kit.utils import dist
from simsiam_kit.utils.device import cpu_facts, thread_settings
from simsiam_kit.utils.io import atomic_write_json

if TYPE_CHECKING:
    from simsiam_kit.pretrain import Pretraining


def summary_path(run: RunDir) -> Path:
    """``results/pretrain.json``: written once a run has trained all its epochs."""
    return run.results / "pretrain.json"


def start_lines(
    p: Pretraining, run: RunDir, steps_per_epoch: int, resumed_after: Optional[int], amendment: dict
) -> list[str]:
    """Lines printed when a run starts: where it writes, how it trains (device, processes, precision,
    memory format, data placement, images, batch, lr), what it resumes, then :func:`start_notes`."""
    cfg, data, world = p.cfg, p.data, dist.get_world_size()
    setup = (
        f"device {p.device} ({world} process{'es' if world > 1 else ''}), precision {p.precision.name}, "
        f"channels_last {p.channels_last}, compile {p.compiled}, data on device {data.device_resident}"
        + ("" if data.train.in_memory else f", {data.workers} loader workers")
        + "; "
        f"{len(data.train)} train images, batch {cfg.optim.batch_size}, "
        f"lr {p.init_lr:g}, {steps_per_epoch} steps/epoch"
        + (f"; resuming after epoch {resumed_after}" if resumed_after is not None else "")
        + (f" (amended: {', '.join(f'{k}={v}' for k, v in amendment.items())})" if amendment else "")
    )
    lines = [f"run directory: {run}", setup] + start_notes(cfg, p.device)
    tb = tensorboard_note(cfg.log.tensorboard, "log.tensorboard=false")
    if tb:
        lines.append(tb)
    if data.monitor_off:
        lines.append(
            f"note: the kNN monitor is off: {data.monitor_off}; metrics.jsonl and results/pretrain.json will have "
            "no kNN top-1 (train.knn_every=0 turns it off without this note)"
        )
    return lines


def start_notes(cfg: PretrainConfig, device: torch.device) -> list[str]:
    """Lines printed when a run starts: the image settings and CPU threads in force, and warnings for a busy
    machine and for the demo's MNIST settings applied to other data."""
    th = thread_settings()
    busy = _busy_phrase(th)
    lines = [
        f"images {cfg.data.image_size} px, mean {list(cfg.data.mean)}, std {list(cfg.data.std)}; "
        f"{th['threads']} CPU thread{'s' if th['threads'] != 1 else ''} ({th['chosen_by']}"
        + (f", {busy}" if busy else "")
        + ")"
    ]
    if device.type == "cpu" and th.get("busy") and busy:
        lines.append(
            f"warning: {busy}"
            + ("" if busy.startswith("other processes") else ": other processes keep the CPU busy")
            + ", so this run is slower than the README's figures"
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


def _busy_phrase(th: dict) -> str:
    """What the thread count was judged from, in words: idle CPU time measured from ``/proc/stat`` when it was
    (``measured_by``), the 1-minute load average otherwise; "" when neither is known."""
    cores = th.get("usable_cores")
    if str(th.get("measured_by") or "").startswith("/proc/stat") and th.get("busy_cores") is not None:
        return f"other processes kept {th['busy_cores']:g} of {cores} usable cores busy ({th['measured_by']})"
    if th.get("load_average") is not None:
        return f"load average {th['load_average']:g} on {cores} usable cores"
    return ""


def summarise(p: Pretraining, run: RunDir, elapsed: float, knn_eval: Optional[Callable]) -> dict:
    """``results/pretrain.json`` (last epoch's loss, std, throughput; kNN against a random-init backbone of
    the same architecture, seed and image settings) and the plots."""
    cfg = p.cfg
    recs = [r for r in read_metrics(run.metrics) if r.get("type") == "epoch"]
    last = recs[-1] if recs else {}
    summary: dict[str, Any] = {
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
        # the last digits of the figures move with the thread count and with the CPU's bf16 kernels (AMX or
        # AVX512-BF16): both are recorded (README, "the demo's figures")
        "cpu": cpu_facts(),
        "image_size": cfg.data.image_size,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
    }
    if knn_eval is not None:
        summary.update(_knn_summary(p, recs, last, knn_eval))
    atomic_write_json(summary_path(run), summary)
    if cfg.train.plots:
        from simsiam_kit.plots import plot_pretrain_metrics

        knn_setting = f"k={cfg.train.knn_k}, T={cfg.train.knn_temperature:g}, queries {Path(str(cfg.data.val)).name}"
        plot_pretrain_metrics(
            run.metrics,
            run.plots,
            dim=cfg.model.proj_dim,
            baseline=summary.get("knn_top1_random_init"),
            knn_setting=knn_setting,
        )
    return summary


def _knn_summary(p: Pretraining, recs: list[dict], last: dict, knn_eval: Callable) -> dict:
    """The kNN rows of the summary: the last score and the run's own random-init baseline."""
    cfg = p.cfg
    # the random-init row is the run's own epoch-0 point (its initial weights, scored before training by the
    # kNN monitor); a run that has none (started by an older version) scores the same weights now
    initial = next((r["knn_top1"] for r in recs if r.get("epoch") == 0 and r.get("knn_top1") is not None), None)
    if initial is None:
        from simsiam_kit.weights import random_backbone

        initial = knn_eval(
            random_backbone(cfg.model.arch, cfg.model.stem, cfg.model.zero_init_residual, cfg.train.seed).to(p.device)
        )
    return {
        "knn_top1": last.get("knn_top1"),
        "knn_top1_random_init": initial,
        "knn": {
            "k": cfg.train.knn_k,
            "temperature": cfg.train.knn_temperature,
            "bank": cfg.data.train,
            "queries": cfg.data.val,
            "precision": feature_precision("auto", p.device).name,
            "random_init": f"the run's initial weights (epoch 0, seed {cfg.train.seed})",
        },
    }
