"""Linear probe, following the official protocol (facebookresearch/simsiam ``main_lincls.py``).

Protocol rules, each with its reason:

* The backbone is frozen (``requires_grad=False``) and kept in ``eval()`` for the whole run, so
  BatchNorm uses and keeps its running statistics: the probe measures the pretrained features, not
  features re-normalised to the probe's data.
* The head is one ``Linear(feature_dim, classes)`` initialised N(0, 0.01) with zero bias; it sees the
  raw pooled features (no l2 normalisation), as in the official code.
* SGD, momentum 0.9, weight decay 0, lr = base_lr x batch / 256 (base 0.1) with a cosine decay
  evaluated once per epoch; LARS (apex ``LARC`` with trust coefficient 0.001, no clipping, the
  official ``--lars`` option for batch 4096) is selectable (both in :mod:`simsiam_kit.engine.optim`).
* Training images: RandomResizedCrop(scale 0.08-1) + horizontal flip; evaluation images: the one
  evaluation rule (:func:`simsiam_kit.image_settings.eval_resize_crop`): as they are at the model's size
  (32 px CIFAR arrays), else the shorter side to size / 0.875 and a centre crop (224 px from 256 px for
  ImageNet), for files and arrays alike. No colour augmentation.
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

from simsiam_kit.engine import Trainer
from simsiam_kit.engine.hooks import EpochAverages, Hook, LRSchedule, MetricsWriter, ProgressBar, Throughput
from simsiam_kit.engine.optim import OPTIMIZERS, build_optimizer
from simsiam_kit.engine.step import OptimStep
from simsiam_kit.errors import UserError, check_number
from simsiam_kit.evaluation.protocol import EvalInputs, EvalSettings
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

    Registered before the metrics writer so the epoch line of metrics.jsonl carries the scores."""

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
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer '{optimizer}' (available: {', '.join(OPTIMIZERS)})")
    device = device or next(head.parameters()).device
    init_lr = base_lr * batch_size / 256
    opt = build_optimizer(optimizer, head.parameters(), init_lr, momentum=momentum, weight_decay=weight_decay)
    history: list[dict] = []

    class _Record(Hook):
        def after_epoch(self, trainer) -> None:
            history.append({"epoch": trainer.epoch, "lr": trainer.state.get("lr"), **trainer.epoch_metrics})

    # hooks run in the order registered: schedule, timing, averages, test scores (before the metrics
    # line that carries them), metrics.jsonl, progress, record
    hooks: list[Hook] = [LRSchedule(opt, init_lr, epochs), Throughput(), EpochAverages()]
    if eval_features is not None:
        hooks.append(HeadEvaluation(head, eval_features, eval_labels))
    if metrics_path is not None:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text("")
        hooks.append(MetricsWriter(metrics_path, log_every, sinks))
    hooks += [ProgressBar(progress, desc="linear"), _Record()]
    head.train()
    Trainer(LinearStep(head, opt, features_fn, device, backbone), loader, epochs, hooks).train()
    return history


# ------------------------------------------------------------------------------------------ command
@dataclass(frozen=True)
class LinearSettings(EvalSettings):
    epochs: int = 90
    cached_features: bool = False
    batch_size: int = 256
    lr: float = 0.1  # base lr; the lr used is lr x batch / 256
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_min_scale: float = 0.08
    seed: int = 0
    progress: bool = False
    lr_sweep: bool = False  # cached features only: one head per (lr, wd), chosen on held-out training images
    tensorboard: Optional[bool] = None  # OUTPUT/tensorboard; None = when the tensorboard package is installed


def run_linear_probe(s: LinearSettings, output: Path, log: Callable[[str], None] = print) -> dict:
    """Train and score the head(s); write results.json, head.pt, metrics.jsonl, plots (and TensorBoard).

    An output directory that holds an earlier evaluation's results is refused unless ``s.overwrite``."""
    from simsiam_kit.evaluation.common import check_output

    check_output(Path(output), s.overwrite)
    return LinearProtocol(s).run(output, log)


class LinearProtocol:
    """The linear probe: options checked once (:meth:`validate`), :meth:`run` on the shared inputs
    (prepare features or the augmented loader, train the head or the sweep, score) to the results.json
    record, :meth:`write` of its own files (head.pt, plots, results.json)."""

    name = "linear"

    def __init__(self, settings: LinearSettings):
        self.s = settings
        self.validate()

    def validate(self) -> None:
        from simsiam_kit.config import FLOAT32_MAX

        s = self.s
        check_number("--epochs", s.epochs, 1, integer=True)
        check_number("--batch-size", s.batch_size, 1, integer=True)
        check_number("--workers", s.workers, 0, integer=True)
        check_number("--seed", s.seed, 0, 2**32 - 1, integer=True)
        # the optimizer holds lr x batch / 256 and the weight decay as float32 scalars
        check_number("--lr", s.lr, 0, FLOAT32_MAX * 256 / max(s.batch_size, 1), low_open=True)
        check_number("--weight-decay", s.weight_decay, 0, FLOAT32_MAX)
        if s.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown --optimizer '{s.optimizer}' (available: {', '.join(OPTIMIZERS)})")
        if s.lr_sweep and not s.cached_features:
            raise UserError("--lr-sweep trains its heads on cached features: add --cached-features")
        if s.lr_sweep and s.optimizer != "sgd":
            raise UserError("--lr-sweep sweeps SGD learning rates: use --optimizer sgd")

    def run(self, output: Path, log: Callable[[str], None] = print) -> dict:
        from simsiam_kit.engine.loggers import closing_all, make_sinks, tensorboard_note

        s = self.s
        inputs = EvalInputs.build(s, output, log, seed=s.seed)
        with inputs.writing_output(s.overwrite):  # locked: one evaluation at a time writes here
            if tensorboard_note(s.tensorboard):
                log(tensorboard_note(s.tensorboard))
            with closing_all(make_sinks(inputs.output, s.tensorboard)) as sinks:
                prep = self._prepare(inputs, log)
                trained = self._train(inputs, prep, sinks)
                check_backbone_unchanged(prep["backbone"], prep["reference"])  # the official sanity check
                results = self._results(inputs, prep, trained)
                self.write(inputs, prep, trained, results, log)
                for sk in sinks:  # the test scores next to the curves
                    sk.scalars(
                        {"type": "eval", "step": s.epochs, "test_top1": results["top1"], "test_top5": results["top5"]}
                    )
                return results

    def _prepare(self, inputs: EvalInputs, log: Callable[[str], None] = print) -> dict:
        """Frozen backbone and its reference state, test features, and the training batches: cached
        features or augmented images through the frozen backbone; what ``--skip-bad-images`` left out of the
        extracted sets (logged in one line)."""
        from simsiam_kit.evaluation.common import skipped_images, skipped_line
        from simsiam_kit.features import extract_features

        s, device = self.s, inputs.device
        backbone = freeze(inputs.loaded.model.to(device))
        reference = snapshot_state(backbone)
        torch.manual_seed(s.seed)
        kw = inputs.feature_kwargs(max(s.batch_size, 64), s.workers, normalize=False)
        t0 = time.perf_counter()
        fq, lq, iq = extract_features(backbone, inputs.test, **kw)
        skipped = {"test": skipped_images(inputs.test, iq)}
        bs = min(s.batch_size, len(inputs.train))
        ft = lt = None
        if s.cached_features:
            ft, lt, it = extract_features(backbone, inputs.train, **kw)
            if len(ft) == 0:
                raise UserError(f"no readable images in train dataset '{s.train_data}'")
            skipped = {"train": skipped_images(inputs.train, it), **skipped}
            loader = TensorLoader(ft, lt, bs, shuffle=True, seed=s.seed)

            def features_fn(batch):
                return batch["features"].to(device, non_blocking=True)
        else:
            loader, features_fn = self._augmented(inputs, backbone, bs)
        if len(fq) == 0:
            raise UserError(f"no readable images in test dataset '{s.test_data}'")
        if skipped_line(skipped):
            log(skipped_line(skipped))
        return dict(
            backbone=backbone, reference=reference, fq=fq, lq=lq, ft=ft, lt=lt, bs=bs,
            loader=loader, features_fn=features_fn, prep_s=time.perf_counter() - t0, skipped=skipped,
        )  # fmt: skip

    def _augmented(self, inputs: EvalInputs, backbone, bs: int):
        """The full protocol's loader and features: RandomResizedCrop + flip, then the frozen backbone."""
        from simsiam_kit.config import DataConfig
        from simsiam_kit.data.loaders import make_loader
        from simsiam_kit.data.transforms import BatchAugment

        s, img, device, precision, train = self.s, inputs.img, inputs.device, inputs.precision, inputs.train
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

        return loader, features_fn

    def _train(self, inputs: EvalInputs, prep: dict, sinks) -> dict:
        """One head (SGD or LARS) or, with ``lr_sweep``, every head of the sweep in one pass
        (evaluation/linear_sweep.py) with the chosen one kept."""
        s, device, output = self.s, inputs.device, inputs.output
        t1 = time.perf_counter()
        if s.lr_sweep:
            from simsiam_kit.evaluation.linear_sweep import run_sweep

            sweep = run_sweep(
                prep["ft"], prep["lt"], len(inputs.classes), s.epochs, prep["bs"], device, momentum=s.momentum,
                seed=s.seed, metrics_path=output / "metrics.jsonl", progress=s.progress, sinks=sinks,
            )  # fmt: skip
            head, history = sweep.bank.head(sweep.selected).to(device), sweep.history
            chosen = sweep.grid[sweep.selected]
            lr, weight_decay, protocol = chosen["lr"], chosen["weight_decay"], "cached-features, lr sweep"
        else:
            sweep = None
            head = make_head(int(prep["fq"].shape[1]), len(inputs.classes)).to(device)
            history = train_linear_head(
                head, prep["loader"], prep["features_fn"], s.epochs, base_lr=s.lr, batch_size=prep["bs"],
                optimizer=s.optimizer, momentum=s.momentum, weight_decay=s.weight_decay,
                eval_features=prep["fq"], eval_labels=prep["lq"], metrics_path=output / "metrics.jsonl",
                progress=s.progress, backbone=prep["backbone"], device=device, sinks=sinks,
            )  # fmt: skip
            lr, weight_decay, protocol = s.lr, s.weight_decay, "cached-features" if s.cached_features else "full"
        return dict(
            head=head, history=history, sweep=sweep, lr=lr, weight_decay=weight_decay, protocol=protocol,
            train_s=time.perf_counter() - t1,
        )  # fmt: skip

    def _results(self, inputs: EvalInputs, prep: dict, trained: dict) -> dict:
        s, fq, bs, lr = self.s, prep["fq"], prep["bs"], trained["lr"]
        final = evaluate_head(trained["head"], fq, prep["lq"])
        settings = asdict(s)
        settings.update(inputs.settings_record())
        settings.update(
            batch_size=bs,
            init_lr=lr * bs / 256,
            lr=lr,
            weight_decay=trained["weight_decay"],
            protocol=trained["protocol"],
            train_images=len(inputs.train),
            test_images=int(len(fq)),
            feature_dim=int(fq.shape[1]),
            num_classes=len(inputs.classes),
        )
        history, sweep = trained["history"], trained["sweep"]
        if sweep is not None:
            chosen = sweep.grid[sweep.selected]
            outcome = {
                "selected": {**chosen, "test_top1": final["top1"], "test_top5": final["top5"]},
                "sweep": sweep.grid,
                "selection": "held-out 10% of the training features (seeded), never the test set",
            }
        else:
            best = max(history, key=lambda r: r.get("test_top1", -1))
            outcome = {"best_top1": best.get("test_top1"), "best_epoch": best.get("epoch")}
        return {
            "top1": final["top1"],
            "top5": final["top5"],
            **outcome,
            "settings": settings,
            **_run_record(history, prep["prep_s"], trained["train_s"], inputs.classes, inputs.loaded),
            # --skip-bad-images: how many test images (and, with cached features, training images) were left out;
            # in full mode the loader skips unreadable training images again in every epoch
            "skipped_images": prep["skipped"],
        }

    def write(self, inputs: EvalInputs, prep: dict, trained: dict, results: dict, log: Callable[[str], None]) -> None:
        """head.pt, the curves or sweep plot, the sweep table, and results.json (last, atomically)."""
        from simsiam_kit.utils.io import atomic_write_json

        s, output, loaded, sweep = self.s, inputs.output, inputs.loaded, trained["sweep"]
        head_extra = {"lr": trained["lr"], "weight_decay": trained["weight_decay"]} if sweep is not None else {}
        feature_dim = int(prep["fq"].shape[1])
        _save_head(output / "head.pt", trained["head"], loaded, feature_dim, inputs.classes, inputs.img, **head_extra)
        if s.plots and sweep is not None:
            from simsiam_kit.evaluation.linear_sweep import plot_sweep

            title = f"linear probe lr sweep, {loaded.arch}/{loaded.stem}"
            plot_sweep(sweep.grid, sweep.selected, output / "plots" / "lr_sweep.png", title)
            results["plots"] = ["plots/lr_sweep.png"]
        elif s.plots:
            title = f"linear probe ({results['settings']['protocol']}), {loaded.arch}/{loaded.stem}"
            plot_curves(
                trained["history"], output / "plots" / "linear_curves.png", title, augmented=not s.cached_features
            )
            results["plots"] = ["plots/linear_curves.png"]
        if sweep is not None:
            from simsiam_kit.evaluation.linear_sweep import sweep_table

            log(sweep_table(sweep.grid, sweep.selected))
        atomic_write_json(output / "results.json", results)


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
