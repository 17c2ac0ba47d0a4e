"""SimSiam pretraining in the shape of detectron2's ``DefaultTrainer``: a :class:`Pretrainer` with build
steps, ``resume_or_load()``, ``build_hooks()`` and ``train()`` around the shared
:class:`~simsiam_kit.engine.Trainer`.

* :func:`build_pretraining` (``Pretrainer.build_pretraining``) turns a :class:`PretrainConfig` into everything
  a training loop needs (data, augmentation, model, optimizer, the step function): ``run_pretrain`` and the
  benchmarks call it, so a benchmark times exactly what ``simsiam-kit pretrain`` runs. It is made of
  ``Pretrainer.build_data``, ``build_model`` and ``build_optimizer``.
* ``Pretrainer.build_hooks`` lists the hooks; they run in the list's order.
* :func:`run_pretrain` locks the run directory (:class:`~simsiam_kit.engine.run_dir.RunDir` owns its
  layout), then a :class:`Pretrainer` resumes or starts (the rules: ``simsiam_kit/engine/resume.py``),
  trains, checkpoints named objects in one call (the :class:`~simsiam_kit.engine.hooks.Checkpointer` hook
  over :class:`~simsiam_kit.engine.checkpoint.Checkpointables`), and writes ``results/pretrain.json`` and
  the plots (``simsiam_kit/engine/report.py``).

What a run directory guarantees (docs/reliability.md): one process trains in it at a time (a lock);
a directory that holds something else is not overwritten unless asked; ``backbone.pt`` and
``checkpoints/last.pt`` are written atomically, backbone first, from finite weights only; a resumed run
takes the same steps as an uninterrupted one and keeps ``config.yaml`` as written (the changes
:data:`~simsiam_kit.engine.resume.RESUME_MAY_CHANGE` allows are recorded in ``config.amendments.yaml``).

Where a change goes: a new augmentation op -> ``data/transforms.py``; a new backbone -> ``models/backbones.py``;
a new per-epoch measurement -> a hook in ``engine/hooks.py`` added in ``Pretrainer.build_hooks``; a new config
key -> ``config.py`` (one dataclass field, read where it is used).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, cast

import numpy as np
import torch

from simsiam_kit.config import PretrainConfig, to_dict
from simsiam_kit.data import load_dataset
from simsiam_kit.data.datasets import ImageDataset, resize_in_memory
from simsiam_kit.data.loaders import make_loader, resolve_device_resident
from simsiam_kit.data.transforms import BatchAugment
from simsiam_kit.engine import Trainer
from simsiam_kit.engine.checkpoint import Checkpointables, ModelState, RNGState, save_backbone, unwrap
from simsiam_kit.engine.hooks import (
    Checkpointer,
    CollapseMonitor,
    EpochAverages,
    Hook,
    KNNMonitor,
    LRSchedule,
    MetricsWriter,
    ProgressBar,
    ThreadRecheck,
    Throughput,
)
from simsiam_kit.engine.loggers import closing_all, log_images, make_sinks, png_to_array, view_pairs_grid
from simsiam_kit.engine.online_probe import OnlineProbe, OnlineProbeMonitor
from simsiam_kit.engine.report import start_lines, summarise, summary_path
from simsiam_kit.engine.resume import (
    RESUME_MAY_CHANGE,
    ResumePoint,
    default_run_dir,
    find_latest_run,
    load_run_config,
    prepare_run_dir,
    prepare_run_files,
)
from simsiam_kit.engine.run_dir import RunDir
from simsiam_kit.engine.step import OptimStep
from simsiam_kit.errors import TrainingDiverged, UserError
from simsiam_kit.features import FEATURE_BATCH, eval_resized, extract_features, feature_precision
from simsiam_kit.losses import output_std, simsiam_loss
from simsiam_kit.models import build_simsiam
from simsiam_kit.models.backbones import get_backbone_entry
from simsiam_kit.models.simsiam import SimSiam
from simsiam_kit.retrieval.knn import knn_classify
from simsiam_kit.utils import dist
from simsiam_kit.utils.device import (
    Precision,
    resolve_channels_last,
    resolve_compile,
    resolve_device,
    resolve_precision,
    resolve_workers,
)
from simsiam_kit.utils.syncbn import convert_sync_batchnorm

__all__ = [
    "RESUME_MAY_CHANGE",
    "PretrainData",
    "Pretrainer",
    "PretrainStep",
    "Pretraining",
    "build_pretraining",
    "default_run_dir",
    "find_latest_run",
    "load_run_config",
    "make_knn_eval",
    "make_probe_eval",
    "resolve_online_probe",
    "run_pretrain",
    "seed_everything",
]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


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
        self._nonfinite: Optional[torch.Tensor] = None  # device bool: a non-finite loss since the last check

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
    monitor_off: Optional[str] = None  # why the kNN monitor is off although train.knn_every asks for it


@dataclass
class Pretraining:
    """Everything one SimSiam training loop needs, built from a config by :func:`build_pretraining`."""

    cfg: PretrainConfig
    device: torch.device
    precision: Precision
    channels_last: bool
    compiled: bool
    data: PretrainData
    model: SimSiam  # the plain module (checkpoints, kNN monitor)
    net: torch.nn.Module  # what the step calls: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    init_lr: float
    aug_gen: torch.Generator
    step: PretrainStep


def resolve_online_probe(flag: Optional[bool], data: PretrainData) -> bool:
    """``train.online_probe``: needs labelled training images and a labelled val set; auto = on for in-memory
    data (CIFAR-sized runs), off for file datasets (simsiam_kit/engine/online_probe.py)."""
    possible = data.val is not None and data.train.has_labels
    if flag and not possible:
        raise UserError(
            "train.online_probe=true needs labelled training images and a labelled data.val (with train.knn_every > 0)"
        )
    return possible and (bool(flag) if flag is not None else data.train.in_memory)


class Pretrainer:
    """SimSiam pretraining in one run directory, in the shape of detectron2's ``DefaultTrainer``.

    Construction reads and checks what a resumed run continues from (before anything is built, so a
    refused resume costs nothing), seeds, builds the parts (:meth:`build_pretraining`), the checkpointables,
    the metric sinks and the :class:`Trainer` with :meth:`build_hooks`. :meth:`train` then runs
    :meth:`resume_or_load`, trains the epochs left and writes the summary. The ``build_*`` steps are
    classmethods or methods a subclass may override; the module's :func:`build_pretraining` is the one
    benchmarks call."""

    def __init__(
        self,
        cfg: PretrainConfig,
        run: RunDir,
        device: Optional[torch.device] = None,
        log: Callable[[str], None] = print,
        resume: bool = False,
    ):
        self.cfg, self.run, self.log = cfg, run, log
        self.resume_point = ResumePoint.read(run, cfg) if resume else None
        self.epoch_unfinished = False  # set by resume_or_load: the checkpointed epoch lacks its metrics line
        self.only_summary_left = False  # set by resume_or_load: killed after its last checkpoint
        seed_everything(cfg.train.seed + dist.get_rank(), cfg.train.deterministic)
        self.p = self.build_pretraining(cfg, device)
        self.checkpointables = self.build_checkpointables()
        self.knn_eval = make_knn_eval(self.p)
        self.sinks = self.build_sinks()
        self.trainer = Trainer(
            self.p.step, self.p.data.loader, cfg.optim.epochs, max_steps_per_epoch=cfg.train.max_steps_per_epoch
        )
        self.trainer.register_hooks(self.build_hooks())

    # ------------------------------------------------------------------------------------------- build steps
    @classmethod
    def build_data(
        cls, cfg: PretrainConfig, device: torch.device, dataset: Optional[ImageDataset] = None
    ) -> PretrainData:
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
        val, off = None, None
        if cfg.train.knn_every > 0 and not cfg.data.val:
            off = "data.val is null (no queries)"
        elif cfg.train.knn_every > 0 and not train.has_labels:
            off = f"data.train ({cfg.data.train}) has images without labels (-1), and the bank needs labels"
        elif cfg.train.knn_every > 0:
            assert cfg.data.val is not None  # the first branch took a null data.val
            val = eval_resized(  # the kNN monitor's queries and bank: the evaluation rule, as eval knn takes them
                load_dataset(cfg.data.val, cfg.data.root, cfg.data.download, cfg.data.skip_bad_images),
                cfg.data.image_size,
            )
            if not val.has_labels:
                val, off = None, f"data.val ({cfg.data.val}) has images without labels (-1)"
        bank = eval_resized(dataset, cfg.data.image_size) if val is not None else None  # train itself at that size
        return PretrainData(train, val, loader, augment, resident, workers, bank, off)

    @classmethod
    def build_model(cls, cfg: PretrainConfig, device: torch.device, channels_last: bool) -> SimSiam:
        """SimSiam (backbone + projector + predictor), SyncBN under DDP, on the device."""
        model = build_simsiam(cfg.model)
        if dist.is_dist() and cfg.train.sync_bn:
            model = cast(SimSiam, convert_sync_batchnorm(model, device.type))  # the same module, its BNs swapped
        return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    @classmethod
    def build_optimizer(cls, cfg: PretrainConfig, model: torch.nn.Module, init_lr: float) -> torch.optim.Optimizer:
        """SGD as in the official code; on CUDA the fused kernel (one launch for all parameters)."""
        m = unwrap(model)
        if cfg.optim.fix_pred_lr and isinstance(m, SimSiam) and m.has_predictor:
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

    @classmethod
    def wrap_model(cls, model: torch.nn.Module, device: torch.device, compiled: bool) -> torch.nn.Module:
        """What the step calls: the model under DDP when distributed, compiled when asked (the parameters
        are shared; checkpoints save the plain module)."""
        net = model
        if dist.is_dist():
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        return cast(torch.nn.Module, torch.compile(net)) if compiled else net  # compiling a module gives one

    @classmethod
    def build_pretraining(
        cls, cfg: PretrainConfig, device: Optional[torch.device] = None, dataset: Optional[ImageDataset] = None
    ) -> Pretraining:
        """Everything for the loop; the model's initial weights come from torch's global RNG (seed it first)."""
        device = device or resolve_device(cfg.train.device)
        precision = resolve_precision(cfg.train.precision, device)
        channels_last = resolve_channels_last(cfg.train.channels_last, device, precision)
        compiled = resolve_compile(cfg.train.compile, device)
        data = cls.build_data(cfg, device, dataset)
        model = cls.build_model(cfg, device, channels_last)
        init_lr = cfg.optim.base_lr * cfg.optim.batch_size / 256
        optimizer = cls.build_optimizer(cfg, model, init_lr)
        # augmentation draws its parameters where it runs: a CUDA generator keeps the step free of host syncs
        aug_gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
        aug_gen.manual_seed(cfg.train.seed * 1000 + dist.get_rank())
        net = cls.wrap_model(model, device, compiled)
        if compiled and device.type == "cuda":
            data.augment.compile()
        probe = None
        if resolve_online_probe(cfg.train.online_probe, data) and data.val is not None:  # it refuses a val-less true
            classes = max(data.train.num_classes, data.val.num_classes)
            probe = OnlineProbe(get_backbone_entry(cfg.model.arch).feature_dim, classes, device, cfg.optim.batch_size)
        step = PretrainStep(net, optimizer, data.augment, precision, device, channels_last, aug_gen, cfg, probe=probe)
        return Pretraining(
            cfg, device, precision, channels_last, compiled, data, model, net, optimizer, init_lr, aug_gen, step
        )

    def build_checkpointables(self) -> Checkpointables:
        """The named objects of a checkpoint (model, optimizer, GradScaler, RNG streams, online probe)."""
        p = self.p
        return Checkpointables(
            model=ModelState(p.model),
            optimizer=p.optimizer,
            scaler=p.step.update.scaler,
            rng=RNGState(p.aug_gen),
            probe=p.step.probe,
        )

    def build_sinks(self) -> list:
        """TensorBoard / W&B, written by rank 0 (none on the other ranks)."""
        cfg, root = self.cfg, self.run.root
        if not dist.is_main():
            return []
        return make_sinks(root, cfg.log.tensorboard, cfg.log.wandb, cfg.log.wandb_project, root.name, to_dict(cfg))

    def write_backbone(self, progress: dict) -> None:
        """``backbone.pt``: the backbone alone, with its image settings and progress (the checkpoint's companion)."""
        cfg = self.cfg
        settings = {"image_size": cfg.data.image_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std)}
        save_backbone(
            self.run.backbone, self.p.model.backbone, cfg.model.arch, cfg.model.stem, {**settings, **progress}
        )

    def build_hooks(self) -> list[Hook]:
        """The hooks, in the order they run: the CPU thread re-check (the epoch's end already runs with the
        count it chooses), the schedule, throughput, epoch averages and the collapse monitor
        (they fill the epoch's metrics), the checkpointer (the epoch's weights are on disk before anything
        else runs), the kNN and online-probe monitors, the metrics writer (its epoch line carries their
        values), the progress bar (it closes after them)."""
        cfg, p, log = self.cfg, self.p, self.log
        writer = MetricsWriter(self.run.metrics, cfg.train.log_every, self.sinks)
        o = cfg.optim
        hooks: list[Hook] = [
            ThreadRecheck(log),
            LRSchedule(p.optimizer, p.init_lr, o.epochs, o.warmup_epochs, o.schedule, o.lr_per_step),
            Throughput(),
            EpochAverages(),
            CollapseMonitor(cfg.model.proj_dim, cfg.train.collapse_warn_std, log),
            Checkpointer(
                self.checkpointables,
                self.run.checkpoint,
                cfg.train.checkpoint_every,
                extra={"config": to_dict(cfg)},
                check=p.step.check,
                companion=self.write_backbone,
            ),
        ]
        if self.knn_eval is not None:  # its epoch-0 line (initial weights) is written like every epoch line
            hooks.append(KNNMonitor(self.knn_eval, cfg.train.knn_every, record=writer.write, log=log))
        if p.step.probe is not None:
            hooks.append(OnlineProbeMonitor(make_probe_eval(p, batch_size=min(512, max(64, o.batch_size)))))
        return hooks + [writer, ProgressBar(cfg.train.progress, desc=f"pretrain {cfg.name}")]

    # ------------------------------------------------------------------------------------------------ running
    def resume_or_load(self) -> None:
        """Continue from the checkpoint read at construction, or start fresh; then prepare the run's files
        (:func:`~simsiam_kit.engine.resume.prepare_run_files`, rank 0). A resumed run that had trained all
        its epochs has only its summary left, or is refused when it has that too."""
        point, trainer, epochs = self.resume_point, self.trainer, self.cfg.optim.epochs
        if point is not None:
            self.checkpointables.load_state_dict(point.checkpoint, source=str(self.run.checkpoint))
            trainer.load_state_dict(point.trainer_state)
            if trainer.start_epoch >= epochs:
                if summary_path(self.run).is_file():
                    raise UserError(
                        f"{self.run.checkpoint}: run already finished ({trainer.start_epoch}/{epochs} "
                        "epochs); raise optim.epochs with --set to train longer"
                    )
                self.only_summary_left = True
        self.epoch_unfinished = dist.on_main(
            prepare_run_files, self.run, self.cfg, point, trainer.start_epoch, self.log
        )
        dist.barrier()

    def train(self) -> dict:
        """Resume or start, train the epochs left, write the summary; returns it on rank 0 ({} elsewhere)."""
        with closing_all(self.sinks):  # flushed and closed however the run ends
            self.resume_or_load()
            point = self.resume_point
            if dist.is_main():
                amendment = point.amendment if point is not None else {}
                resumed_after = self.trainer.start_epoch if point is not None else None
                for line in start_lines(self.p, self.run, self.trainer.steps_per_epoch, resumed_after, amendment):
                    self.log(line)
            # killed after the checkpoint, before the epoch's monitor and metrics line
            if self.epoch_unfinished and point is not None:
                self.trainer.finish_epoch(point.epoch_metrics, after=Checkpointer)
            if point is None:
                self.log_view_pairs()
            t0 = time.time()
            if not self.only_summary_left:
                self.trainer.train()
            elapsed = time.time() - t0
            # collective: a kNN error in the summary (rank 0) stops every rank instead of leaving them at a barrier
            summary = dist.on_main(summarise, self.p, self.run, elapsed, self.knn_eval)
            self.log_plots()
            dist.barrier()
            return summary if dist.is_main() else {}

    def log_view_pairs(self) -> None:
        """Two augmented views of the first images, to the sinks (in-memory data, a new run)."""
        cfg, data = self.cfg, self.p.data
        if not (self.sinks and cfg.log.view_pairs > 0 and data.train.in_memory):
            return
        augment = BatchAugment(cfg.data, masked=False)
        n = min(cfg.log.view_pairs, len(data.train))
        grid = view_pairs_grid(data.train.images, augment, cfg.data.mean, cfg.data.std, n=n, seed=cfg.train.seed)
        log_images(self.sinks, {"views/image_view1_view2": grid})

    def log_plots(self) -> None:
        """The final plots, to the sinks next to the scalars."""
        if self.sinks and self.run.plots.is_dir():
            plots = {f"plots/{f.stem}": png_to_array(f) for f in sorted(self.run.plots.glob("*.png"))}
            log_images(self.sinks, plots, step=self.trainer.global_step)


def build_pretraining(
    cfg: PretrainConfig, device: Optional[torch.device] = None, dataset: Optional[ImageDataset] = None
) -> Pretraining:
    """Everything for the loop (:meth:`Pretrainer.build_pretraining`); the model's initial weights come from
    torch's global RNG (seed it first)."""
    return Pretrainer.build_pretraining(cfg, device, dataset)


def make_probe_eval(p: Pretraining, batch_size: int) -> Callable[[], float]:
    """Val top-1 of the online probe: raw (not l2-normalised) backbone features in eval mode, as the
    offline linear probe sees them."""

    def probe_eval() -> float:
        cfg, val, probe = p.cfg, p.data.val, p.step.probe
        assert val is not None and probe is not None  # the probe runs only with a labelled val set
        f, y, _ = extract_features(
            p.model.backbone,
            val,
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
        return probe.top1(f, y)

    return probe_eval


def make_knn_eval(p: Pretraining, batch_size: int = FEATURE_BATCH) -> Optional[Callable]:
    """The kNN monitor's evaluation: features of the (first ``knn_bank_limit``) training images as the bank,
    the val set as queries, weighted kNN on the training device. None when the monitor is off.

    Features follow the one extraction rule of ``simsiam_kit/features.py`` (fp32, contiguous, whatever the
    training precision and memory format), so ``eval knn`` on the same weights and data gives the same number."""
    cfg, data, val = p.cfg, p.data, p.data.val
    if val is None:
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
        kw: dict[str, Any] = dict(
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
        fq, lq, _ = extract_features(bb, val, **kw)
        pred, _ = knn_classify(
            fb,
            lb,
            fq,
            k=min(cfg.train.knn_k, len(fb)),
            temperature=cfg.train.knn_temperature,
            num_classes=max(data.train.num_classes, val.num_classes),
        )
        return 100.0 * (pred == lq.to(pred.device)).float().mean().item()

    return knn_eval


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
        dist.on_main(prepare_run_dir, run, resume, overwrite, log)
        return Pretrainer(cfg, run, device, log, resume=resume).train()
    finally:
        run.unlock()
