"""Linear probe, following the official protocol (facebookresearch/simsiam ``main_lincls.py``).

Protocol rules, each with its reason:

* The backbone is frozen (``requires_grad=False``) and kept in ``eval()`` for the whole run, so
  BatchNorm uses and keeps its running statistics: the probe measures the pretrained features, not
  features re-normalised to the probe's data.
* The head is one ``Linear(feature_dim, classes)`` initialised N(0, 0.01) with zero bias; it sees the
  raw pooled features (no l2 normalisation), as in the official code.
* SGD, momentum 0.9, weight decay 0, lr = base_lr x batch / 256 (base 0.1) with a cosine decay
  evaluated once per epoch; LARS (apex ``LARC`` with trust coefficient 0.001, no clipping, the
  official ``--lars`` option for batch 4096) is selectable.
* Training images: RandomResizedCrop(scale 0.08-1) + horizontal flip; evaluation images: resize +
  center crop (file datasets; 224 px from 256 px for ImageNet) or the image itself (32 px CIFAR
  arrays). No colour augmentation.
* After training, every backbone tensor (weights and BatchNorm buffers) is compared with its value
  before training; any change raises :class:`BackboneChanged` (the official ``sanity_check``).

Training runs :class:`simsiam_kit.engine.Trainer` (the pretraining loop) with a
:class:`LinearStep`. The test set is evaluated after every epoch; since the backbone is frozen and
in eval mode, its features are extracted once and the head is evaluated on them (identical to
re-running the backbone each epoch, minus the cost).

``--cached-features`` is a fast approximation of the protocol: training features are extracted once
without augmentation (center crop) and the head trains on those tensors, seconds instead of hours.
It usually lands close to, but not exactly at, the full protocol's accuracy (no crop augmentation).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from simsiam_kit.config import DEFAULT_DATA_ROOT
from simsiam_kit.engine import Trainer
from simsiam_kit.engine.hooks import EpochAverages, Hook, LRSchedule, MetricsWriter, ProgressBar, Throughput
from simsiam_kit.engine.step import OptimStep
from simsiam_kit.errors import UserError, check_number
from simsiam_kit.utils.io import atomic_savefig

HEAD_FORMAT = "simsiam-kit-linear-head"


class BackboneChanged(RuntimeError):
    """A backbone tensor changed during the linear probe (the protocol's sanity check failed)."""


# ------------------------------------------------------------------------------------------ pieces
def make_head(feature_dim: int, num_classes: int) -> torch.nn.Linear:
    """Linear classifier initialised as in ``main_lincls.py``: weight ~ N(0, 0.01), bias = 0."""
    head = torch.nn.Linear(feature_dim, num_classes)
    torch.nn.init.normal_(head.weight, mean=0.0, std=0.01)
    torch.nn.init.zeros_(head.bias)
    return head


def freeze(backbone: torch.nn.Module) -> torch.nn.Module:
    """No gradients and eval mode (BatchNorm statistics frozen)."""
    backbone.requires_grad_(False)
    backbone.eval()
    return backbone


def snapshot_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}


def check_backbone_unchanged(backbone: torch.nn.Module, reference: dict) -> None:
    """Raise :class:`BackboneChanged` naming every tensor that differs from ``reference``."""
    now = backbone.state_dict()
    changed = [k for k, v in reference.items() if k not in now or not torch.equal(now[k].detach().cpu(), v)]
    changed += [k for k in now if k not in reference]
    if changed:
        raise BackboneChanged(
            f"backbone changed during the linear probe ({len(changed)} tensors: "
            f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); the probe must "
            "keep the backbone frozen and in eval mode"
        )


class LARS:
    """Layer-wise adaptive rate scaling around an SGD optimizer, as apex ``LARC(clip=False)`` used by
    the official ``main_lincls.py --lars``: each tensor's gradient (plus weight decay) is scaled by
    ``trust * ||w|| / (||g|| + wd ||w|| + eps)`` before the wrapped step; tensors with a zero norm
    (the zero-initialised bias at the first step) are left unscaled."""

    def __init__(self, optimizer: torch.optim.Optimizer, trust_coefficient: float = 0.001, eps: float = 1e-8):
        self.optim, self.trust, self.eps = optimizer, trust_coefficient, eps

    @property
    def param_groups(self):
        return self.optim.param_groups

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, sd):
        self.optim.load_state_dict(sd)

    def zero_grad(self, set_to_none: bool = True):
        self.optim.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self):
        saved_wd = []
        for group in self.optim.param_groups:
            wd = group.get("weight_decay", 0.0)
            saved_wd.append(wd)
            group["weight_decay"] = 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                p_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                if p_norm != 0 and g_norm != 0:
                    rate = self.trust * p_norm / (g_norm + p_norm * wd + self.eps)
                    p.grad.add_(p, alpha=wd).mul_(rate)
        self.optim.step()
        for group, wd in zip(self.optim.param_groups, saved_wd):
            group["weight_decay"] = wd


class TensorLoader:
    """Mini-batches of cached features: dict(features (B,D), labels (B,), index (B,)), reshuffled each
    epoch with a seeded generator (``set_epoch``), last partial batch kept (as the official loader)."""

    def __init__(
        self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0
    ):
        self.features, self.labels = features, labels
        self.batch_size, self.shuffle, self.seed, self.epoch = int(batch_size), shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 10007 + self.epoch))
        else:
            order = torch.arange(n)
        for s in range(0, n, self.batch_size):
            idx = order[s : s + self.batch_size]
            yield {"features": self.features[idx], "labels": self.labels[idx], "index": idx}


class LinearStep:
    """One probe step: features from the frozen backbone (or the cache), head forward, cross-entropy,
    backward into the head only, optimizer step."""

    def __init__(
        self,
        head: torch.nn.Module,
        optimizer,
        features_fn: Callable[[dict], torch.Tensor],
        device: torch.device,
        backbone: Optional[torch.nn.Module] = None,
    ):
        self.head, self.features, self.device, self.backbone = head, features_fn, device, backbone
        self.update = OptimStep(optimizer)  # the head trains in fp32 (features may come from a bf16 backbone)

    def __call__(self, batch, trainer):
        if self.backbone is not None and self.backbone.training:
            raise BackboneChanged("the backbone was switched to train mode; the linear probe keeps it in eval()")
        if batch.get("labels") is None:
            raise UserError("a whole batch of images was unreadable and skipped; check the dataset")
        x = self.features(batch)
        y = batch["labels"].to(self.device, non_blocking=True)
        logits = self.head(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise UserError(f"linear probe loss became {loss.item()} at epoch {trainer.epoch + 1}; lower --lr")
        self.update(loss)
        acc = (logits.detach().argmax(1) == y).float().mean() * 100
        return {"loss": loss.detach(), "acc": acc, "images": int(y.shape[0])}


@torch.no_grad()
def evaluate_head(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor, batch: int = 4096) -> dict:
    """top-1 / top-5 (percent) of the head on (features, labels); top-5 is top-k when classes < 5."""
    was = head.training
    head.eval()
    dev = next(head.parameters()).device
    c1 = c5 = 0
    k5 = min(5, head.out_features)
    for s in range(0, len(labels), batch):
        logits = head(features[s : s + batch].to(dev))
        y = labels[s : s + batch].to(dev)
        top = logits.topk(k5, dim=1).indices
        c1 += (top[:, 0] == y).sum().item()
        c5 += (top == y.view(-1, 1)).any(1).sum().item()
    head.train(was)
    n = max(1, len(labels))
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


class HeadEvaluation(Hook):
    """Test top-1/top-5 after every epoch, on features extracted once (the backbone is frozen).

    Runs before the metrics writer (priority 38) so the epoch line of metrics.jsonl carries the scores."""

    priority = 35

    def __init__(self, head, features: torch.Tensor, labels: torch.Tensor):
        self.head, self.features, self.labels = head, features, labels

    def after_epoch(self, trainer) -> None:
        r = evaluate_head(self.head, self.features, self.labels)
        trainer.epoch_metrics["test_top1"] = r["top1"]
        trainer.epoch_metrics["test_top5"] = r["top5"]


def train_linear_head(
    head: torch.nn.Module,
    loader,
    features_fn: Callable[[dict], torch.Tensor],
    epochs: int,
    base_lr: float = 0.1,
    batch_size: int = 256,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eval_features: Optional[torch.Tensor] = None,
    eval_labels: Optional[torch.Tensor] = None,
    metrics_path: Optional[Path] = None,
    progress: bool = False,
    backbone: Optional[torch.nn.Module] = None,
    device: Optional[torch.device] = None,
    log_every: int = 10,
    sinks=(),
) -> list[dict]:
    """Train ``head`` with the shared :class:`Trainer`; returns one record per epoch."""
    if optimizer not in ("sgd", "lars"):
        raise UserError(f"unknown --optimizer '{optimizer}' (available: sgd, lars)")
    device = device or next(head.parameters()).device
    init_lr = base_lr * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), init_lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "lars":
        opt = LARS(opt)
    hooks: list[Hook] = [
        LRSchedule(opt, init_lr, epochs),
        Throughput(),
        EpochAverages(),
        ProgressBar(progress, desc="linear"),
    ]
    ev = None
    if eval_features is not None:
        ev = HeadEvaluation(head, eval_features, eval_labels)
        hooks.append(ev)
    if metrics_path is not None:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text("")
        hooks.append(MetricsWriter(metrics_path, log_every, sinks))
    history: list[dict] = []

    class _Record(Hook):
        priority = 80

        def after_epoch(self, trainer) -> None:
            history.append({"epoch": trainer.epoch, "lr": trainer.state.get("lr"), **trainer.epoch_metrics})

    hooks.append(_Record())
    head.train()
    Trainer(LinearStep(head, opt, features_fn, device, backbone), loader, epochs, hooks).train()
    return history


# ------------------------------------------------------------------------------------------ command
@dataclass(frozen=True)
class LinearSettings:
    weights: str
    train_data: str
    test_data: str
    epochs: int = 90
    cached_features: bool = False
    batch_size: int = 256
    lr: float = 0.1  # base lr; the lr used is lr x batch / 256
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_min_scale: float = 0.08
    arch: Optional[str] = None
    stem: Optional[str] = None
    like: Optional[str] = None  # with weights "random": the run whose init, arch, stem and image settings to take
    device: str = "auto"
    precision: str = "auto"  # feature extraction: auto = fp32 (simsiam_kit.features.feature_precision)
    image_size: Optional[int] = None
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    workers: int = 2
    seed: int = 0
    root: str = DEFAULT_DATA_ROOT
    download: bool = False
    skip_bad_images: bool = False
    overwrite: bool = False  # replace the results of an earlier evaluation in the output directory
    progress: bool = False
    plots: bool = True
    lr_sweep: bool = False  # cached features only: one head per (lr, wd), chosen on held-out training images
    tensorboard: Optional[bool] = None  # OUTPUT/tensorboard; None = when the tensorboard package is installed


def run_linear_probe(s: LinearSettings, output: Path, log: Callable[[str], None] = print) -> dict:
    """Train and score the head(s); write results.json, head.pt, metrics.jsonl, plots (and TensorBoard).

    An output directory that holds an earlier evaluation's results is refused unless ``s.overwrite``."""
    from simsiam_kit.engine.loggers import closing_all, make_sinks, tensorboard_note
    from simsiam_kit.evaluation.common import check_output, writing_output

    check_output(Path(output), s.overwrite)
    _check_settings(s)
    with writing_output(Path(output), s.overwrite):  # locked: one evaluation at a time writes here
        if tensorboard_note(s.tensorboard):
            log(tensorboard_note(s.tensorboard))
        with closing_all(make_sinks(Path(output), s.tensorboard)) as sinks:
            res = _run_linear_probe(s, Path(output), log, sinks)
            for sk in sinks:  # the test scores next to the curves
                sk.scalars({"type": "eval", "step": s.epochs, "test_top1": res["top1"], "test_top5": res["top5"]})
            return res


def _check_settings(s: LinearSettings) -> None:
    from simsiam_kit.config import FLOAT32_MAX

    check_number("--epochs", s.epochs, 1, integer=True)
    check_number("--batch-size", s.batch_size, 1, integer=True)
    check_number("--workers", s.workers, 0, integer=True)
    check_number("--seed", s.seed, 0, 2**32 - 1, integer=True)
    # the optimizer holds lr x batch / 256 and the weight decay as float32 scalars
    check_number("--lr", s.lr, 0, FLOAT32_MAX * 256 / max(s.batch_size, 1), low_open=True)
    check_number("--weight-decay", s.weight_decay, 0, FLOAT32_MAX)
    if s.optimizer not in ("sgd", "lars"):
        raise UserError(f"unknown --optimizer '{s.optimizer}' (available: sgd, lars)")
    if s.lr_sweep and not s.cached_features:
        raise UserError("--lr-sweep trains its heads on cached features: add --cached-features")
    if s.lr_sweep and s.optimizer != "sgd":
        raise UserError("--lr-sweep sweeps SGD learning rates: use --optimizer sgd")


def _run_linear_probe(s: LinearSettings, output: Path, log: Callable[[str], None], sinks) -> dict:
    from simsiam_kit.config import DataConfig
    from simsiam_kit.data.loaders import make_loader
    from simsiam_kit.data.transforms import BatchAugment
    from simsiam_kit.evaluation.common import (
        check_same_classes,
        eval_image_settings,
        load_labelled,
        skipped_images,
        skipped_line,
    )
    from simsiam_kit.features import extract_features, feature_precision
    from simsiam_kit.utils.device import resolve_device
    from simsiam_kit.utils.io import atomic_write_json
    from simsiam_kit.weights import load_backbone

    train = load_labelled(s.train_data, "train", s.root, s.download, s.skip_bad_images)
    test = load_labelled(s.test_data, "test", s.root, s.download, s.skip_bad_images)
    classes = check_same_classes(train, test, s.train_data, s.test_data)
    loaded = load_backbone(s.weights, s.arch, s.stem, seed=s.seed, like=s.like)
    if loaded.notice():
        log(loaded.notice())
    img = eval_image_settings(loaded, train, s.image_size, s.mean, s.std)
    device = resolve_device(s.device)
    precision = feature_precision(s.precision, device)
    backbone = freeze(loaded.model.to(device))
    reference = snapshot_state(backbone)
    output = Path(output)
    torch.manual_seed(s.seed)

    kw = dict(
        device=device,
        batch_size=max(s.batch_size, 64),
        precision=precision,
        mean=img.mean,
        std=img.std,
        image_size=img.image_size,
        workers=s.workers,
        normalize=False,
    )
    t0 = time.perf_counter()
    fq, lq, iq = extract_features(backbone, test, **kw)
    skipped = {"test": skipped_images(test, iq)}
    bs = min(s.batch_size, len(train))
    if s.cached_features:
        ft, lt, it = extract_features(backbone, train, **kw)
        if len(ft) == 0:
            raise UserError(f"no readable images in train dataset '{s.train_data}'")
        skipped = {"train": skipped_images(train, it), **skipped}
        loader = TensorLoader(ft, lt, bs, shuffle=True, seed=s.seed)

        def features_fn(batch):
            return batch["features"].to(device, non_blocking=True)
    else:
        loader = make_loader(
            train,
            bs,
            train=True,
            seed=s.seed,
            mode="train_crop",
            image_size=img.image_size,
            workers=s.workers,
            crop_scale=(s.crop_min_scale, 1.0),
            flip_p=0.5,
        )
        data_cfg = DataConfig(image_size=img.image_size, mean=img.mean, std=img.std, flip_prob=0.5)
        # in-memory arrays: crop + flip here, batched; image files: the loader's workers cropped and flipped
        augment = BatchAugment(data_cfg, crop=train.in_memory, crop_scale=(s.crop_min_scale, 1.0), color=False)
        gen = torch.Generator().manual_seed(s.seed * 1000 + 1)

        @torch.no_grad()
        def features_fn(batch):
            x = augment(batch["images"].to(device, non_blocking=True), gen)
            with precision.autocast():
                f = backbone(x)
            return f.float()

    if len(fq) == 0:
        raise UserError(f"no readable images in test dataset '{s.test_data}'")
    if skipped_line(skipped):
        log(skipped_line(skipped))
    prep_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    if s.lr_sweep:  # all heads in one pass (evaluation/linear_sweep.py); the chosen head is scored on test
        from simsiam_kit.evaluation.linear_sweep import plot_sweep, run_sweep, sweep_table

        sweep = run_sweep(
            ft,
            lt,
            len(classes),
            s.epochs,
            bs,
            device,
            momentum=s.momentum,
            seed=s.seed,
            metrics_path=output / "metrics.jsonl",
            progress=s.progress,
            sinks=sinks,
        )
        head, history = sweep.bank.head(sweep.selected).to(device), sweep.history
        chosen = sweep.grid[sweep.selected]
        lr, weight_decay, protocol = chosen["lr"], chosen["weight_decay"], "cached-features, lr sweep"
    else:
        head = make_head(int(fq.shape[1]), len(classes)).to(device)
        history = train_linear_head(
            head,
            loader,
            features_fn,
            s.epochs,
            base_lr=s.lr,
            batch_size=bs,
            optimizer=s.optimizer,
            momentum=s.momentum,
            weight_decay=s.weight_decay,
            eval_features=fq,
            eval_labels=lq,
            metrics_path=output / "metrics.jsonl",
            progress=s.progress,
            backbone=backbone,
            device=device,
            sinks=sinks,
        )
        lr, weight_decay, protocol = s.lr, s.weight_decay, "cached-features" if s.cached_features else "full"
    train_s = time.perf_counter() - t1
    check_backbone_unchanged(backbone, reference)  # the official sanity check: raises if anything moved

    final = evaluate_head(head, fq, lq)
    settings = asdict(s)
    settings.update(
        mean=list(img.mean),
        std=list(img.std),
        image_size=img.image_size,
        image_settings_from=dict(img.sources),
        arch=loaded.arch,
        stem=loaded.stem,
        weights_source=loaded.source,
        device=str(device),
        precision=precision.name,
        batch_size=bs,
        init_lr=lr * bs / 256,
        lr=lr,
        weight_decay=weight_decay,
        protocol=protocol,
        train_images=len(train),
        test_images=int(len(fq)),
        feature_dim=int(fq.shape[1]),
        num_classes=len(classes),
    )
    if s.lr_sweep:
        outcome = {
            "selected": {**chosen, "test_top1": final["top1"], "test_top5": final["top5"]},
            "sweep": sweep.grid,
            "selection": "held-out 10% of the training features (seeded), never the test set",
        }
    else:
        best = max(history, key=lambda r: r.get("test_top1", -1))
        outcome = {"best_top1": best.get("test_top1"), "best_epoch": best.get("epoch")}
    results = {
        "top1": final["top1"],
        "top5": final["top5"],
        **outcome,
        "settings": settings,
        **_run_record(history, prep_s, train_s, classes, loaded),
        # --skip-bad-images: how many test images (and, with cached features, training images) were left out;
        # in full mode the loader skips unreadable training images again in every epoch
        "skipped_images": skipped,
    }
    head_extra = {"lr": lr, "weight_decay": weight_decay} if s.lr_sweep else {}
    _save_head(output / "head.pt", head, loaded, int(fq.shape[1]), classes, img, **head_extra)
    if s.plots and s.lr_sweep:
        plot_sweep(
            sweep.grid,
            sweep.selected,
            output / "plots" / "lr_sweep.png",
            f"linear probe lr sweep, {loaded.arch}/{loaded.stem}",
        )
        results["plots"] = ["plots/lr_sweep.png"]
    elif s.plots:
        plot_curves(
            history,
            output / "plots" / "linear_curves.png",
            f"linear probe ({settings['protocol']}), {loaded.arch}/{loaded.stem}",
            augmented=not s.cached_features,
        )
        results["plots"] = ["plots/linear_curves.png"]
    if s.lr_sweep:
        log(sweep_table(sweep.grid, sweep.selected))
    atomic_write_json(output / "results.json", results)
    return results


def _save_head(path: Path, head: torch.nn.Module, loaded, feature_dim: int, classes, img, **extra) -> None:
    """``head.pt``: the head's state dict and what a user needs to apply it (arch, classes, preprocessing)."""
    from simsiam_kit.utils.io import atomic_torch_save

    atomic_torch_save(
        {
            "format": HEAD_FORMAT,
            "version": 1,
            "state_dict": {k: v.cpu() for k, v in head.state_dict().items()},
            "arch": loaded.arch,
            "stem": loaded.stem,
            "feature_dim": feature_dim,
            "classes": [str(c) for c in classes],
            "weights": loaded.source,
            "image_size": img.image_size,
            "mean": list(img.mean),
            "std": list(img.std),
            **extra,
        },
        path,
    )


def _run_record(history, prep_s: float, train_s: float, classes, loaded) -> dict:
    """The part of results.json both probes share: per-epoch records, timing, the sanity check, provenance."""
    return {
        "epochs": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in history],
        "timing_s": {"features": round(prep_s, 3), "train": round(train_s, 3), "total": round(prep_s + train_s, 3)},
        "backbone_unchanged": True,
        "classes": [str(c) for c in classes],
        "weights": loaded.record,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def plot_curves(history: Sequence[dict], path: Path, title: str, augmented: bool = True) -> Path:
    """Loss and accuracy per epoch. ``augmented``: whether the training accuracy is on augmented crops (the
    full protocol) or on the cached, unaugmented features (``--cached-features``); the legend says which."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    ep = [r["epoch"] for r in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    a1.plot(ep, [r.get("loss") for r in history], marker="o" if len(ep) < 30 else None, ms=3)
    a1.set_xlabel("epoch")
    a1.set_ylabel("train loss")
    a1.grid(alpha=0.3)
    marker = "o" if len(ep) < 30 else None
    train_label = "train top-1 (augmented crops)" if augmented else "train top-1 (cached features, not augmented)"
    a2.plot(ep, [r.get("acc") for r in history], label=train_label, marker=marker, ms=3)
    a2.plot(ep, [r.get("test_top1") for r in history], label="test top-1", marker=marker, ms=3)
    a2.plot(ep, [r.get("test_top5") for r in history], label="test top-5", ls="--")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy (%)")
    a2.legend(fontsize=7, loc="best")
    a2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def results_table(results: dict) -> str:
    from simsiam_kit.evaluation.common import format_table

    st = results["settings"]
    if "sweep" in results:
        sel = results["selected"]
        return (
            f"linear probe lr sweep {st['arch']}/{st['stem']}: {len(results['sweep'])} heads, "
            f"{st['epochs']} epochs, "
            f"batch {st['batch_size']}; selected on held-out training images: base lr {sel['lr']:g}, weight decay "
            f"{sel['weight_decay']:g} (held-out top-1 {sel['holdout_top1']:.2f} %)\n"
            f"test: top-1 {results['top1']:.2f} %  top-5 {results['top5']:.2f} %; backbone unchanged"
        )
    nan = float("nan")
    rows = [
        [r["epoch"], f"{r.get('loss', nan):.4f}", r.get("acc", nan), r.get("test_top1", nan), r.get("test_top5", nan)]
        for r in results["epochs"]
    ]
    if len(rows) > 12:  # keep the printout small: first 3, last 9
        rows = rows[:3] + [["...", "", "", "", ""]] + rows[-8:]
    head = (
        f"linear probe ({st['protocol']}) {st['arch']}/{st['stem']}: {st['train_images']} train / "
        f"{st['test_images']} test images, batch {st['batch_size']}, lr {st['init_lr']:g} ({st['optimizer']}), "
        f"{st['epochs']} epochs"
    )
    return (
        head
        + "\n"
        + format_table(["epoch", "loss", "train acc %", "test top-1 %", "test top-5 %"], rows)
        + "\n"
        + f"final: top-1 {results['top1']:.2f} %  top-5 {results['top5']:.2f} %  (best top-1 "
        f"{results['best_top1']:.2f} % at epoch {results['best_epoch']}); backbone unchanged"
    )
