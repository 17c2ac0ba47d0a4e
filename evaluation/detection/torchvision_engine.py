"""Detection transfer with ``torchvision.models.detection``: Faster R-CNN, ResNet-FPN, on the same
backbone weights the detectron2 engine uses. Runs on CPU or one GPU, in CI and everywhere.

Protocol: the pretrained backbone is loaded into a fresh module built by its backbone entry
(:mod:`simsiam_kit.models.backbones`) with the chosen norm layer (BN, SyncBN or FrozenBN) with zero missing
keys (checked and reported), wrapped in an FPN over the stages the entry names (``BackboneWithFPN``), and
the whole detector is fine-tuned for a fixed number of iterations with SGD, linear warm-up and step decay,
horizontal flips, then evaluated with pycocotools. Training runs on the shared
:class:`simsiam_kit.engine.Trainer` with a detection step function.

Output directory: ``config.yaml`` (resolved), ``metrics.jsonl``, ``results.json``,
``coco_detections.json``, ``predictions.png`` (and ``model_final.pt`` with ``train.save_model``).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from simsiam_kit.config import load_config, load_yaml, resolve_config_path, save_config, to_dict
from simsiam_kit.engine import Hook, Trainer
from simsiam_kit.engine.hooks import EpochAverages, MetricsWriter, ProgressBar, Throughput
from simsiam_kit.engine.loggers import make_sinks, tensorboard_note
from simsiam_kit.engine.step import OptimStep
from simsiam_kit.errors import TrainingDiverged, UserError
from simsiam_kit.evaluation.detection.data import DetectionData, DetectionSet
from simsiam_kit.evaluation.detection.metrics import coco_evaluate, to_coco_detections
from simsiam_kit.evaluation.detection.outputs import make_readable, write_json
from simsiam_kit.utils.device import resolve_device, resolve_precision

NORMS = ("bn", "syncbn", "frozen_bn")


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DetModelConfig:
    norm: str = "syncbn"  # bn | syncbn (BN on one process) | frozen_bn (torchvision's default for fine-tuning)
    # the last n stages train, the stem too at stages + 1 (a ResNet's 5: all of conv1..layer4, as the paper
    # fine-tunes everything); 3 = torchvision's default
    trainable_layers: int = 5
    fpn_channels: int = 256
    min_size: int = 800  # shorter image side after resizing (torchvision GeneralizedRCNNTransform)
    max_size: int = 1333
    # proposal and ROI sampling budgets (torchvision defaults); the box head's cost scales with them
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    # mean/std: the backbone's own pretraining normalisation (stored with it) unless given here
    image_mean: Optional[tuple] = None
    image_std: Optional[tuple] = None


@dataclass(frozen=True)
class DetSolverConfig:
    iters: int = 18000
    batch_size: int = 2  # images per iteration
    base_lr: float = 0.02  # lr at batch 16, scaled linearly to batch_size
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    steps: tuple = (0.75, 0.92)  # lr x gamma at these fractions of iters (detectron2-style step decay)
    gamma: float = 0.1
    grad_clip: float = 0.0  # max grad norm, 0 = off


@dataclass(frozen=True)
class DetDataConfig:
    hflip_prob: float = 0.5
    filter_empty: bool = True  # drop training images without boxes (detectron2's FILTER_EMPTY_ANNOTATIONS)
    workers: int = 2


@dataclass(frozen=True)
class DetTrainConfig:
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA) | auto
    seed: int = 0
    log_every: int = 20
    progress: bool = True
    save_model: bool = False


@dataclass(frozen=True)
class DetTestConfig:
    batch_size: int = 2
    score_thresh: float = 0.05
    detections_per_img: int = 100
    vis_images: int = 4
    vis_score: float = 0.5


@dataclass(frozen=True)
class TorchvisionDetectionConfig:
    name: str = "torchvision_r50_fpn"
    model: DetModelConfig = field(default_factory=DetModelConfig)
    solver: DetSolverConfig = field(default_factory=DetSolverConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    train: DetTrainConfig = field(default_factory=DetTrainConfig)
    test: DetTestConfig = field(default_factory=DetTestConfig)


def load_detection_config(name_or_path: str, overrides=None) -> TorchvisionDetectionConfig:
    path = resolve_config_path(name_or_path, "detection")
    raw = load_yaml(path)
    if "_BASE_" in raw or any(k.isupper() for k in raw):
        raise UserError(f"{path} is a detectron2 config; use it with --engine detectron2")
    cfg = load_config(TorchvisionDetectionConfig, str(path), overrides, group="detection")
    from simsiam_kit.models.backbones import BACKBONES

    # up front, the most any entry trains (stages + stem); build_fpn_backbone checks the one loaded
    most = max(len(trainable_groups(e)) for e in BACKBONES.values())
    checks = [
        (cfg.model.norm in NORMS, "model.norm", cfg.model.norm, " | ".join(NORMS)),
        (0 <= cfg.model.trainable_layers <= most, "model.trainable_layers", cfg.model.trainable_layers, f"0..{most}"),
        (cfg.model.min_size >= 32, "model.min_size", cfg.model.min_size, ">= 32"),
        (cfg.solver.iters >= 1, "solver.iters", cfg.solver.iters, ">= 1"),
        (cfg.solver.batch_size >= 1, "solver.batch_size", cfg.solver.batch_size, ">= 1"),
        (cfg.solver.base_lr > 0, "solver.base_lr", cfg.solver.base_lr, "> 0"),
        (0 <= cfg.solver.momentum < 1, "solver.momentum", cfg.solver.momentum, "in [0, 1)"),
        (cfg.solver.weight_decay >= 0, "solver.weight_decay", cfg.solver.weight_decay, ">= 0"),
        (cfg.solver.warmup_iters >= 0, "solver.warmup_iters", cfg.solver.warmup_iters, ">= 0"),
        (0 < cfg.solver.warmup_factor <= 1, "solver.warmup_factor", cfg.solver.warmup_factor, "in (0, 1]"),
        (0 < cfg.solver.gamma <= 1, "solver.gamma", cfg.solver.gamma, "in (0, 1]"),
        (cfg.solver.grad_clip >= 0, "solver.grad_clip", cfg.solver.grad_clip, ">= 0 (0 = off)"),
        (0 <= cfg.data.hflip_prob <= 1, "data.hflip_prob", cfg.data.hflip_prob, "a probability in [0, 1]"),
        (cfg.data.workers >= 0, "data.workers", cfg.data.workers, ">= 0"),
        (0 <= cfg.train.seed <= 2**32 - 1, "train.seed", cfg.train.seed, "in [0, 2**32-1]"),
        (cfg.test.batch_size >= 1, "test.batch_size", cfg.test.batch_size, ">= 1"),
        (0 <= cfg.test.score_thresh <= 1, "test.score_thresh", cfg.test.score_thresh, "in [0, 1]"),
        (0 <= cfg.test.vis_score <= 1, "test.vis_score", cfg.test.vis_score, "in [0, 1]"),
        (cfg.test.detections_per_img >= 1, "test.detections_per_img", cfg.test.detections_per_img, ">= 1"),
        (all(0 < s <= 1 for s in cfg.solver.steps), "solver.steps", cfg.solver.steps, "fractions in (0, 1]"),
        (
            cfg.model.image_mean is None or len(cfg.model.image_mean) == 3,
            "model.image_mean",
            cfg.model.image_mean,
            "3 numbers",
        ),
        (
            cfg.model.image_std is None or len(cfg.model.image_std) == 3,
            "model.image_std",
            cfg.model.image_std,
            "3 numbers",
        ),
    ]
    for ok, key, value, want in checks:
        if not ok:
            raise UserError(f"{path}: bad value for '{key}': {value!r} (expected {want})")
    return cfg


# ---------------------------------------------------------------------------------------------- model


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        from torchvision.ops.misc import FrozenBatchNorm2d

        return FrozenBatchNorm2d
    return nn.BatchNorm2d


#: the strides of the feature maps the FPN taps (its levels P2..P5; the anchor sizes 32..512 assume them)
FPN_STRIDES = (4, 8, 16, 32)


def trainable_groups(entry) -> list[tuple[str, ...]]:
    """What ``model.trainable_layers = n`` trains: the first n groups, the last stage first and the stem
    modules last (torchvision's ``resnet_fpn_backbone`` rule: 3 = the last three stages)."""
    return [(name,) for name in reversed(entry.stage_names)] + [tuple(entry.stem_modules)]


def build_fpn_backbone(loaded, norm: str, trainable_layers: int, out_channels: int = 256):
    """The backbone ``loaded.arch``'s entry builds (with ``norm``), loaded from ``loaded.model``'s weights
    and wrapped in an FPN over the entry's stages (their names and channels).

    Returns ``(BackboneWithFPN, report)``; the load must leave no backbone key missing."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from simsiam_kit.models.backbones import get_backbone_entry

    entry = get_backbone_entry(loaded.arch)
    check_fpn_stem(entry, loaded.stem, loaded.source)
    groups = trainable_groups(entry)
    if not 0 <= trainable_layers <= len(groups):
        raise UserError(
            f"model.trainable_layers {trainable_layers}: {entry.name} has {len(groups)} groups to train "
            f"({len(entry.stages)} stages and the stem); expected 0..{len(groups)}"
        )
    body = entry.build(loaded.stem, zero_init_residual=False, norm_layer=_norm_layer(norm))
    sd = loaded.model.state_dict()
    if norm == "frozen_bn":  # FrozenBatchNorm2d has no step counter
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    res = body.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise UserError(
            f"{loaded.source}: backbone weights do not fit {entry.name}: "
            f"missing {list(res.missing_keys)[:5]}, unexpected {list(res.unexpected_keys)[:5]}"
        )
    report = {
        "backbone_keys": len(body.state_dict()),
        "loaded": len(sd),
        "missing": list(res.missing_keys),
        "unexpected": list(res.unexpected_keys),
        "source": loaded.source,
    }
    train_names = [name for group in groups[:trainable_layers] for name in group]
    for name, p in body.named_parameters():
        p.requires_grad_(any(name == t or name.startswith(t + ".") for t in train_names))
    backbone = BackboneWithFPN(
        body,
        {name: str(i) for i, name in enumerate(entry.stage_names)},
        list(entry.stage_channels),
        out_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=None,
    )
    if norm == "syncbn":
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    return backbone, report


def check_fpn_stem(entry, stem: str, source: str) -> None:
    """Refuse a stem whose stages do not have the FPN's strides (4..32), naming the stems that do."""
    strides = entry.feature_strides(stem)
    if strides != FPN_STRIDES:
        s = entry.stem(stem)
        fits = [name for name in entry.stems if entry.feature_strides(name) == FPN_STRIDES]
        raise UserError(
            f"{source}: the backbone has the {stem} stem ({s.kernel}x{s.kernel}/{s.stride} conv, "
            f"{'max-pool' if s.maxpool else 'no max-pool'}), so its stages have strides {list(strides)}; the "
            f"FPN needs strides {list(FPN_STRIDES)}. Pretrain with model.stem={' or '.join(fits) or '(none)'}"
        )


def build_detector(cfg: TorchvisionDetectionConfig, loaded, num_classes: int):
    from torchvision.models.detection import FasterRCNN

    backbone, report = build_fpn_backbone(loaded, cfg.model.norm, cfg.model.trainable_layers, cfg.model.fpn_channels)
    mean = cfg.model.image_mean or loaded.mean
    std = cfg.model.image_std or loaded.std
    model = FasterRCNN(
        backbone,
        num_classes=num_classes + 1,
        min_size=cfg.model.min_size,
        max_size=cfg.model.max_size,
        image_mean=list(mean),
        image_std=list(std),
        box_score_thresh=cfg.test.score_thresh,
        box_detections_per_img=cfg.test.detections_per_img,
        rpn_pre_nms_top_n_train=cfg.model.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.model.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.model.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.model.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.model.box_batch_size_per_image,
    )
    report["image_mean"], report["image_std"] = list(mean), list(std)
    return model, report


# ---------------------------------------------------------------------------------------------- data


def _read_image(path) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from simsiam_kit.data import to_rgb  # the one decoding rule (16-bit grayscale scaled, not clipped)

    try:
        with Image.open(path) as im:
            return pil_to_tensor(to_rgb(im)).float().div_(255)
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from None


class DetectionTorchDataset(torch.utils.data.Dataset):
    def __init__(self, ds: DetectionSet, train: bool, hflip_prob: float = 0.0):
        self.ds, self.train, self.hflip_prob = ds, train, hflip_prob

    def __len__(self) -> int:
        return len(self.ds.records)

    def __getitem__(self, i: int):
        rec = self.ds.records[i]
        img = _read_image(rec["file"])
        keep = rec["iscrowd"] == 0 if self.train else np.ones(len(rec["boxes"]), bool)
        boxes = torch.as_tensor(rec["boxes"][keep], dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(rec["labels"][keep], dtype=torch.int64)
        if self.train and self.hflip_prob > 0 and random.random() < self.hflip_prob:
            w = img.shape[-1]
            img = img.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        return img, {"boxes": boxes, "labels": labels, "image_id": rec["image_id"], "index": i}


def _collate(batch):
    return tuple(zip(*batch))


class IterationLoader:
    """``iters`` batches from a shuffled DataLoader, reshuffled each pass (iteration-based training)."""

    def __init__(self, dataset, batch_size: int, iters: int, workers: int, seed: int):
        self.iters = iters
        g = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(dataset) >= batch_size,
            generator=g,
            num_workers=workers,
            collate_fn=_collate,
            persistent_workers=workers > 0,
            worker_init_fn=_seed_worker,
        )

    def __len__(self) -> int:
        return self.iters

    def __iter__(self):
        n = 0
        while n < self.iters:
            for batch in self.loader:
                yield batch
                n += 1
                if n >= self.iters:
                    return


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


# ---------------------------------------------------------------------------------------------- training


class WarmupMultiStepLR(Hook):
    """Linear warm-up from ``warmup_factor * lr`` over ``warmup_iters``, then ``lr * gamma^k`` after each step."""

    def __init__(self, optimizer, base_lr: float, warmup_iters: int, warmup_factor: float, steps: list, gamma: float):
        self.opt, self.base_lr, self.warmup_iters, self.warmup_factor = optimizer, base_lr, warmup_iters, warmup_factor
        self.steps, self.gamma = sorted(steps), gamma

    def lr_at(self, it: int) -> float:
        lr = self.base_lr * self.gamma ** sum(1 for s in self.steps if it >= s)
        if it < self.warmup_iters:
            a = it / self.warmup_iters
            lr *= self.warmup_factor * (1 - a) + a
        return lr

    def before_step(self, trainer) -> None:
        lr = self.lr_at(trainer.global_step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        trainer.state["lr"] = lr


class StepTimes(Hook):
    """Seconds per iteration (data + forward + backward + update) for the benchmark and results.json."""

    def __init__(self):
        self.times: list = []

    def after_step(self, trainer) -> None:
        self.times.append(trainer.step_time)


class DetectionStep:
    """One Faster R-CNN training iteration: the detector returns its losses in train mode; the update
    is the shared :class:`OptimStep` (GradScaler for fp16 on CUDA, optional clipping)."""

    def __init__(self, model, optimizer, device, precision, grad_clip: float):
        self.model, self.device, self.precision = model, device, precision
        self.update = OptimStep(optimizer, precision, grad_clip)

    def __call__(self, batch, trainer):
        images, targets = batch
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [{"boxes": t["boxes"].to(self.device), "labels": t["labels"].to(self.device)} for t in targets]
        self.model.train()
        with self.precision.autocast():
            losses = self.model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"detection loss became {loss.item()} at iteration {trainer.global_step + 1} "
                f"({ {k: round(float(v), 4) for k, v in losses.items()} }); lower solver.base_lr"
            )
        self.update(loss)
        out = {"loss": loss.detach()}
        out.update({k: v.detach() for k, v in losses.items()})
        out["images"] = len(images)
        return out


@torch.no_grad()
def predict(model, ds: DetectionSet, device, batch_size: int, precision=None) -> list:
    """Per record: ``{"boxes" (N,4 xyxy original pixels), "scores", "labels" (1..K)}`` as numpy."""
    model.eval()
    dataset = DetectionTorchDataset(ds, train=False)
    out = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        imgs = [im.to(device) for im, _ in items]
        if precision is not None:
            with precision.autocast():
                preds = model(imgs)
        else:
            preds = model(imgs)
        for p in preds:
            out.append(
                {
                    k: p[k].float().cpu().numpy() if k != "labels" else p[k].cpu().numpy()
                    for k in ("boxes", "scores", "labels")
                }
            )
    return out


def evaluate_detector(model, ds: DetectionSet, device, batch_size: int, precision=None) -> tuple[dict, list, list]:
    preds = predict(model, ds, device, batch_size, precision)
    dets = []
    l2c = ds.label_to_cat_id
    for rec, p in zip(ds.records, preds):
        dets += to_coco_detections(rec["image_id"], p["boxes"], p["scores"], p["labels"], l2c)
    return coco_evaluate(ds.coco, dets), dets, preds


def run_torchvision_detection(
    cfg: TorchvisionDetectionConfig,
    weights: str,
    data: DetectionData,
    out_dir: Path,
    iters: Optional[int] = None,
    arch: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune Faster R-CNN R-FPN on ``data.train`` from ``weights``, evaluate on ``data.val``."""

    from simsiam_kit.weights import is_random, load_backbone

    if iters is not None:
        cfg = replace(cfg, solver=replace(cfg.solver, iters=iters))
    out_dir = Path(out_dir)
    if (out_dir / "results.json").exists():
        raise UserError(f"{out_dir} already holds detection results; pick another --output")
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)

    random_init = is_random(weights)
    loaded = load_backbone(
        weights, arch=arch if random_init else None, stem="imagenet" if random_init else None, seed=cfg.train.seed
    )
    if loaded.notice():
        log(loaded.notice())
    train_set, dropped = _training_set(data.train, cfg.data.filter_empty)
    model, report = build_detector(cfg, loaded, data.train.num_classes)
    model.to(device)

    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.solver.base_lr * cfg.solver.batch_size / 16
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.solver.momentum, weight_decay=cfg.solver.weight_decay)
    loader = IterationLoader(
        DetectionTorchDataset(train_set, True, cfg.data.hflip_prob),
        cfg.solver.batch_size,
        cfg.solver.iters,
        cfg.data.workers,
        cfg.train.seed,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    make_readable(out_dir / "config.yaml")
    (out_dir / "metrics.jsonl").write_text("")
    if tensorboard_note():
        log(tensorboard_note())
    sinks = make_sinks(out_dir)  # TensorBoard in OUTPUT/tensorboard when installed (simsiam_kit.engine.loggers)
    timer = StepTimes()
    hooks = _build_hooks(cfg, optimizer, lr, timer, out_dir, sinks)
    step = DetectionStep(model, optimizer, device, precision, cfg.solver.grad_clip)
    trainer = Trainer(step, loader, epochs=1, hooks=hooks, max_steps_per_epoch=cfg.solver.iters)
    log(
        f"torchvision Faster R-CNN {loaded.arch}-FPN ({cfg.model.norm}, {cfg.model.trainable_layers} trainable stages) "
        f"from {loaded.source}: backbone {report['loaded']}/{report['backbone_keys']} tensors loaded, "
        f"{len(report['missing'])} missing"
    )
    log(
        f"train {len(train_set.records)} images ({dropped} without boxes dropped), val {len(data.val.records)} images, "
        f"{data.train.num_classes} classes; {cfg.solver.iters} iterations x {cfg.solver.batch_size} images, "
        f"lr {lr:g}, min_size {cfg.model.min_size}, device {device}, {precision.name}"
    )
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0

    t1 = time.time()
    metrics, dets, preds = evaluate_detector(model, data.val, device, cfg.test.batch_size, precision)
    eval_s = time.time() - t1
    results = {
        **_results_head(cfg, weights, loaded, device, precision),
        **{k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
        "per_class": metrics["per_class"],
        "num_detections": metrics["num_detections"],
        "backbone_load": report,
        **_timing(timer, train_s, eval_s),
        "train_images": len(train_set.records),
        "val_images": len(data.val.records),
        "final_loss": trainer.epoch_metrics.get("loss"),
    }
    _write_outputs(cfg, data, out_dir, model, results, dets, preds, sinks)
    return results


def _training_set(train_set: DetectionSet, filter_empty: bool) -> tuple[DetectionSet, int]:
    """The training images (without those that have no box, with ``filter_empty``) and how many were dropped."""
    dropped = 0
    if filter_empty:
        keep = [r for r in train_set.records if int((r["iscrowd"] == 0).sum()) > 0]
        dropped = len(train_set.records) - len(keep)
        train_set = replace(train_set, records=keep)
    if not train_set.records:
        raise UserError(f"{train_set.json_path or train_set.name}: no training image has a box")
    return train_set, dropped


def _build_hooks(cfg: TorchvisionDetectionConfig, optimizer, lr: float, timer: StepTimes, out_dir: Path, sinks) -> list:
    """The training hooks, in the order they run: warmup + multi-step LR, throughput, epoch averages,
    step times, metrics.jsonl, progress bar."""
    steps = [max(1, int(round(f * cfg.solver.iters))) for f in cfg.solver.steps if f < 1]
    return [
        WarmupMultiStepLR(
            optimizer,
            lr,
            min(cfg.solver.warmup_iters, cfg.solver.iters),
            cfg.solver.warmup_factor,
            steps,
            cfg.solver.gamma,
        ),
        Throughput(),
        EpochAverages(),
        timer,
        MetricsWriter(out_dir / "metrics.jsonl", cfg.train.log_every, sinks),
        ProgressBar(cfg.train.progress, desc="detection"),
    ]


def _results_head(cfg: TorchvisionDetectionConfig, weights, loaded, device, precision) -> dict:
    return {
        "engine": "torchvision",
        "config": cfg.name,
        "weights": str(weights),
        "arch": loaded.arch,
        "iters": cfg.solver.iters,
        "batch_size": cfg.solver.batch_size,
        "norm": cfg.model.norm,
        "min_size": cfg.model.min_size,
        "device": str(device),
        "precision": precision.name,
    }


def _timing(timer: StepTimes, train_s: float, eval_s: float) -> dict:
    times = timer.times[1:] if len(timer.times) > 1 else timer.times  # the first step warms up
    return {
        "seconds_per_iter": round(statistics.median(times), 4) if times else None,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
    }


def _write_outputs(
    cfg: TorchvisionDetectionConfig, data: DetectionData, out_dir: Path, model, results, dets, preds, sinks
):
    """coco_detections.json, results.json, the box metrics next to the training curves, predictions.png and
    (``train.save_model``) model_final.pt."""
    write_json(out_dir / "coco_detections.json", dets)
    write_json(out_dir / "results.json", results)
    for s in sinks:  # the box metrics next to the training curves
        s.scalars(
            {
                "type": "eval",
                "step": cfg.solver.iters,
                **{k: results[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in results},
            }
        )
        s.close()
    if cfg.test.vis_images > 0:
        from simsiam_kit.evaluation.detection.visualize import save_predictions_png

        save_predictions_png(
            data.val.records,
            preds,
            data.val.class_names,
            out_dir / "predictions.png",
            cfg.test.vis_score,
            cfg.test.vis_images,
        )
    if cfg.train.save_model:
        from simsiam_kit.utils.io import atomic_torch_save

        atomic_torch_save(
            {"model": model.state_dict(), "config": to_dict(cfg), "classes": data.train.class_names},
            out_dir / "model_final.pt",
        )
        make_readable(out_dir / "model_final.pt")
