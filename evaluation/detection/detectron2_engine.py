"""Detection transfer with detectron2: the protocol of the SimSiam paper (Table 5), which follows MoCo's
detection code: Faster R-CNN / Mask R-CNN R50-C4 with SyncBN everywhere, an extra norm after res5 in the
ROI head (:func:`register_res5_extra_norm`), RGB input with the torchvision pixel mean/std (0-255 scale)
and ``STRIDE_IN_1X1: False`` (torchvision's Bottleneck strides in the 3x3 conv). Configs are
detectron2's own YAML format, in ``configs/detection/d2_*.yaml``.

detectron2 is not on PyPI; it is imported inside the functions here, so this module imports without it.
Install it from source (``docs/detection.md``).

Flow: check the launcher options and the config against the data up front (exit code 2, one line), convert
the backbone with :mod:`simsiam_kit.detectron2_weights` (or take a ready ``.pkl``), register the data (COCO JSON with
``register_coco_instances``; Pascal VOC with detectron2's own ``register_pascal_voc``, one dataset per
``YEAR/SPLIT``, as ``voc_2007_trainval`` + ``voc_2012_trainval`` in detectron2's builtin sets), build the
config (file, then dataset/weights/classes, then ``--set`` overrides, then ``--iters``), train with
``DefaultTrainer`` under detectron2's ``launch`` (one process per GPU, any number of machines), evaluate
with ``COCOEvaluator`` (COCO JSON) or ``PascalVOCDetectionEvaluator`` (VOC: the VOC2007 11-point metric
for a 2007 split, as the paper reports), and write ``results.json`` in the same layout as the torchvision
engine, plus ``predictions.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from simsiam_kit.config import resolve_config_path
from simsiam_kit.errors import UserError
from simsiam_kit.evaluation.detection.data import DetectionData, DetectionSet
from simsiam_kit.evaluation.detection.metrics import METRIC_KEYS
from simsiam_kit.weights import is_random

TRAIN_NAME = "simsiam_kit_det_train"
VAL_NAME = "simsiam_kit_det_val"
INSTALL_HINT = (
    "detectron2 is not installed (it is not published on PyPI). Build it from source against your torch, with "
    "its dependencies and 'setuptools<81' installed first (docs/detection.md lists them): git clone "
    "https://github.com/facebookresearch/detectron2.git && pip install --no-build-isolation --no-deps --use-pep517 "
    "-e detectron2; or use --engine torchvision"
)


def quiet_detectron2_import_warnings() -> None:
    """detectron2 compiles a few helpers with ``torch.jit.script``, which torch 2.14 deprecates with a
    FutureWarning at import time; nothing a user of this engine can act on, so it is not shown (that one
    message only)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)


def require_detectron2():
    quiet_detectron2_import_warnings()
    try:
        import detectron2  # noqa: F401
    except ImportError as e:
        raise UserError(f"{INSTALL_HINT} ({e})") from None
    return detectron2


def register_res5_extra_norm() -> None:
    """Register ``Res5ROIHeadsExtraNorm``: detectron2's ``Res5ROIHeads`` with a norm layer (the
    backbone's ``MODEL.RESNETS.NORM``) appended to the res5 head, as in MoCo's detection code (the C4
    head has no norm after res5; with SyncBN fine-tuning, MoCo/SimSiam add one). Idempotent."""
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        @classmethod
        def _build_res5_block(cls, cfg):
            seq, out_channels = super()._build_res5_block(cfg)
            seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
            return seq, out_channels

    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


# ---------------------------------------------------------------------------------------------- schedule


def scale_steps(steps, max_iter: int, iters: int) -> tuple:
    """The LR steps of a ``max_iter``-long schedule moved to an ``iters``-long run.

    Each step keeps its fraction of the schedule (rounded half up), moved into ``1..iters-1``; steps at or
    past ``max_iter`` (or at 0) are dropped, as they never act. The result is what detectron2's
    ``build_lr_scheduler`` (fvcore's ``MultiStepParamScheduler``) accepts: strictly increasing and strictly
    inside ``(0, iters)``. When two steps land on one iteration, the later one moves one iteration on, and
    is dropped when no iteration is left. So a short run keeps every decay that fits: ``--iters 1`` has
    none, ``--iters 2`` one (at iteration 1), ``--iters 10`` of the VOC schedule (8, 9); from a few dozen
    iterations on, every step is at its scaled position.
    """
    if iters < 1 or max_iter < 1:
        raise ValueError(f"iters and max_iter must be >= 1, got {iters} and {max_iter}")
    out: list = []
    for s in sorted(int(s) for s in steps):
        if not 0 < s < max_iter:
            continue
        t = min(max(int(s * iters / max_iter + 0.5), out[-1] + 1 if out else 1), iters - 1)
        if t < 1 or (out and t <= out[-1]):
            break
        out.append(t)
    return tuple(out)


def check_steps(steps, max_iter: int, where: str) -> None:
    """Refuse a schedule detectron2's scheduler would reject at the first iteration."""
    steps = [int(s) for s in steps]
    bad = [s for s in steps if not 0 < s < max_iter]
    if bad or any(b <= a for a, b in zip(steps, steps[1:])):
        raise UserError(
            f"{where}: SOLVER.STEPS {tuple(steps)} must be strictly increasing and inside (0, "
            f"MAX_ITER={max_iter}) (detectron2's LR scheduler rejects anything else)"
        )


# ---------------------------------------------------------------------------------------------- data


@dataclass
class D2Data:
    """One dataset as detectron2 registers it: COCO JSON, or one ``VOC{year}/{split}`` of a VOCdevkit."""

    kind: str  # "coco" | "voc"
    json_path: str = ""  # coco
    images_dir: str = ""  # coco
    devkit: str = ""  # voc: the VOCdevkit directory
    year: int = 0  # voc
    split: str = ""  # voc

    @property
    def dirname(self) -> str:
        return str(Path(self.devkit) / f"VOC{self.year}")

    def describe(self) -> str:
        return self.json_path if self.kind == "coco" else f"{self.dirname}/ImageSets/Main/{self.split}.txt"


def _voc_year(year: str, flag: str) -> int:
    try:
        return int(year)
    except ValueError:
        raise UserError(f"{flag}: VOC year {year!r} is not a number (expected 2007 or 2012)") from None


def _d2_sets(ds: DetectionSet, out_dir: Path, flag: str) -> list:
    if ds.voc_splits:
        sets = [
            D2Data("voc", devkit=str(Path(ds.images_dir).resolve()), year=_voc_year(y, flag), split=s)
            for y, s in ds.voc_splits
        ]
        for d in sets:
            ids = [x for x in Path(d.describe()).read_text().split() if x]
            if len(ids) < 2:  # its numpy.loadtxt makes one id a 0-d array, which it then cannot iterate
                raise UserError(
                    f"{d.describe()}: {len(ids)} image(s); detectron2's pascal_voc loader needs at "
                    "least 2 images in a split list"
                )
        return sets
    json_path = ds.json_path or out_dir / f"{ds.name}_coco.json"  # written later, once out_dir exists
    return [D2Data("coco", json_path=str(Path(json_path).resolve()), images_dir=str(Path(ds.images_dir).resolve()))]


def _check_voc_for_evaluator(d: D2Data) -> None:
    """Read every annotation of the VOC evaluation split with detectron2's own ``parse_rec`` now, so a
    file it cannot read fails here and not after training."""
    import xml.etree.ElementTree as ET

    from detectron2.evaluation.pascal_voc_evaluation import parse_rec

    if d.year not in (2007, 2012):
        raise UserError(
            f"--voc-val {d.year}/{d.split}: detectron2's PascalVOCDetectionEvaluator scores VOC2007 "
            "(11-point AP) or VOC2012 splits only"
        )
    read = getattr(parse_rec, "__wrapped__", parse_rec)  # past its lru_cache: the files as they are now
    for stem in Path(d.describe()).read_text().split():
        xml = Path(d.dirname) / "Annotations" / f"{stem}.xml"
        try:
            read(str(xml))
        except (AttributeError, ValueError, TypeError, ET.ParseError) as e:
            raise UserError(
                f"{xml}: detectron2's PascalVOCDetectionEvaluator cannot read it ({type(e).__name__}: "
                f"{e}); each <object> needs <name>, <pose>, <truncated>, <difficult> and integer "
                "<bndbox> corners"
            ) from None


def _mask_problem(ds: DetectionSet, flag: str) -> Optional[str]:
    """Why ``ds`` cannot train or score Mask R-CNN, or None when every (non-crowd) object has a mask."""
    if ds.voc_splits:
        return f"Pascal VOC ({flag}) has boxes only, no instance masks"
    anns = [a for a in ds.coco.get("annotations", []) if not a.get("iscrowd", 0)]
    without = sum(1 for a in anns if not a.get("segmentation"))
    if without:
        return f"{ds.json_path or ds.name} has {without} of {len(anns)} annotations without a 'segmentation' mask"
    return None


def _classes_with_ground_truth(ds: DetectionSet) -> list:
    """Class names with at least one object the evaluation counts (not crowd, not VOC-difficult)."""
    cats = {a["category_id"] for a in ds.coco["annotations"] if not a.get("iscrowd", 0)}
    return [c["name"] for c in ds.categories if c["id"] in cats]


def register_datasets(train: list, val: D2Data) -> tuple:
    """(Re-)register the train sets and the val set under fixed names (every launched process does this).
    Returns the training dataset names (``cfg.DATASETS.TRAIN``)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances, register_pascal_voc

    from simsiam_kit.evaluation.detection.data import VOC_CLASSES

    names = train_names(train)
    for name, d in list(zip(names, train)) + [(VAL_NAME, val)]:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if d.kind == "coco":
            register_coco_instances(name, {}, d.json_path, d.images_dir)
        else:
            register_pascal_voc(name, d.dirname, d.split, d.year, VOC_CLASSES)
    return names


def train_names(train: list) -> tuple:
    return (TRAIN_NAME,) if len(train) == 1 else tuple(f"{TRAIN_NAME}_{i}" for i in range(len(train)))


def _overrides_to_list(overrides) -> list:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set '{item}': expected KEY=VALUE (for example SOLVER.BASE_LR=0.01)")
        k, v = item.split("=", 1)
        out += [k.strip(), v]
    return out


def _override_keys(overrides) -> set:
    return {item.split("=", 1)[0].strip() for item in overrides or [] if "=" in item}


# ---------------------------------------------------------------------------------------------- job


@dataclass
class D2Job:
    config_file: str
    weights_pkl: str  # "" = random init
    train: list  # [D2Data]
    val: D2Data
    num_classes: int
    class_names: list
    classes_with_gt: list  # val classes the evaluation counts; the others get per-class AP None
    output_dir: str
    overrides: list
    iters: Optional[int]
    num_gpus: int
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"
    vis_images: int = 4


def build_cfg(job: D2Job):
    """detectron2 CfgNode: the YAML (with its ``_BASE_``), then data/weights/classes, then ``--set``, then ``--iters``.

    ``--iters`` moves ``SOLVER.STEPS`` with the length (:func:`scale_steps`) unless ``--set`` gives
    ``SOLVER.STEPS``, and caps precise BN's ``TEST.PRECISE_BN.NUM_ITER`` at the run length unless ``--set``
    gives it. The schedule is checked the way detectron2's LR scheduler checks it."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    try:
        cfg.merge_from_file(job.config_file)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise UserError(f"{job.config_file}: not a detectron2 config this build reads ({e})") from None
    cfg.DATASETS.TRAIN = train_names(job.train)
    cfg.DATASETS.TEST = (VAL_NAME,)
    cfg.MODEL.WEIGHTS = job.weights_pkl
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = job.num_classes
    cfg.OUTPUT_DIR = job.output_dir
    import torch

    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    try:
        cfg.merge_from_list(_overrides_to_list(job.overrides))
    except (KeyError, ValueError, AssertionError) as e:
        raise UserError(f"--set {job.overrides}: {e}") from None
    given = _override_keys(job.overrides)
    if job.iters is not None:
        old = cfg.SOLVER.MAX_ITER
        if "SOLVER.STEPS" not in given:
            cfg.SOLVER.STEPS = scale_steps(cfg.SOLVER.STEPS, old, job.iters)
        cfg.SOLVER.MAX_ITER = job.iters
        cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, job.iters)
        cfg.SOLVER.CHECKPOINT_PERIOD = max(cfg.SOLVER.CHECKPOINT_PERIOD, job.iters)
        if "TEST.PRECISE_BN.NUM_ITER" not in given:
            # precise BN re-estimates the statistics on this many extra forward passes after training;
            # detectron2's 200 would be 200x the training of --iters 1
            cfg.TEST.PRECISE_BN.NUM_ITER = min(cfg.TEST.PRECISE_BN.NUM_ITER, job.iters)
    if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR":
        check_steps(
            [s for s in cfg.SOLVER.STEPS if s <= cfg.SOLVER.MAX_ITER],
            cfg.SOLVER.MAX_ITER,
            Path(job.config_file).name + (f" with --iters {job.iters}" if job.iters is not None else ""),
        )
    cfg.freeze()
    return cfg


# ---------------------------------------------------------------------------------------------- training


def _voc_evaluator_class():
    """detectron2's ``PascalVOCDetectionEvaluator``, unchanged, keeping the per-class APs it computes and
    averages away: ``AP-<class>`` (mean over IoU 0.50:0.95, as its ``AP``), like ``COCOEvaluator``'s keys."""
    from collections import defaultdict

    import numpy as np
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.evaluation import pascal_voc_evaluation as pv

    class VOCEvaluatorWithClasses(PascalVOCDetectionEvaluator):
        def evaluate(self):
            real = pv.voc_eval
            per_class = defaultdict(list)

            def recording(detpath, annopath, imagesetfile, classname, ovthresh=0.5, use_07_metric=False):
                rec, prec, ap = real(detpath, annopath, imagesetfile, classname, ovthresh, use_07_metric)
                per_class[classname].append(ap * 100)
                return rec, prec, ap

            pv.voc_eval = recording
            try:
                ret = super().evaluate()
            finally:
                pv.voc_eval = real
            if ret:
                ret["bbox"].update({f"AP-{c}": float(np.mean(v)) for c, v in per_class.items()})
            return ret

    return VOCEvaluatorWithClasses


def _make_trainer_class():
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator

    class SimSiamKitTrainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            if MetadataCatalog.get(dataset_name).get("dirname") is not None:  # registered by register_pascal_voc
                return _voc_evaluator_class()(dataset_name)
            folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
            return COCOEvaluator(dataset_name, output_dir=folder)

        def build_writers(self):
            return training_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    return SimSiamKitTrainer


def training_writers(output_dir: str, max_iter: int) -> list:
    """detectron2's default event writers (console, ``metrics.json``, TensorBoard), without the TensorBoard
    writer when ``tensorboard`` is not installed: detectron2 lists it as a dependency, but a source install
    with ``--no-deps`` may lack it, and its writer would then fail at the first log line (iteration 20 or
    the last), after training started, hiding the run's results."""
    import importlib.util
    import logging

    from detectron2.engine.defaults import default_writers
    from detectron2.utils.events import TensorboardXWriter

    writers = default_writers(output_dir, max_iter)
    if importlib.util.find_spec("tensorboard") is None:
        logging.getLogger(__name__).warning(
            "tensorboard is not installed: no TensorBoard event file (metrics.json and log.txt are written as usual)"
        )
        writers = [w for w in writers if not isinstance(w, TensorboardXWriter)]
    return writers


def _d2_main(job: D2Job) -> None:
    """Runs in every process started by ``detectron2.engine.launch``."""
    quiet_detectron2_import_warnings()
    from detectron2.engine import default_setup
    from detectron2.utils import comm

    register_res5_extra_norm()
    register_datasets(job.train, job.val)
    cfg = build_cfg(job)
    default_setup(
        cfg,
        argparse.Namespace(
            config_file=job.config_file,
            eval_only=False,
            resume=False,
            num_gpus=job.num_gpus,
            num_machines=job.num_machines,
            machine_rank=job.machine_rank,
            dist_url=job.dist_url,
            opts=job.overrides,
        ),
    )
    Trainer = _make_trainer_class()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    # DefaultTrainer's EvalHook evaluates after the last iteration; fall back to an explicit test
    results = getattr(trainer, "_last_eval_results", None) or Trainer.test(cfg, trainer.model)
    if comm.is_main_process():
        _write_results(cfg, job, results)


def _finite(v) -> float:
    """A metric as a float; NaN (detectron2's "nothing to score", e.g. no detection above the score
    threshold) becomes 0.0, the torchvision engine's convention for the same case."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(v) else v


def summarize_results(results: dict, class_names: list, classes_with_gt: list, voc_year: Optional[int] = None) -> dict:
    """detectron2's evaluation results -> the metric part of ``results.json``, in the torchvision
    engine's conventions: percentages, NaN as 0.0, per-class AP for every class (None for a class without
    ground truth in the evaluation set). VOC results carry AP, AP50, AP75 (``PascalVOCDetectionEvaluator``
    computes no size breakdown); Mask R-CNN results add ``segm`` with the same keys for mask AP."""
    with_gt = set(classes_with_gt)
    out: dict = {}

    def task(res: dict, keys) -> dict:
        t = {k: _finite(res.get(k)) for k in keys}
        t["per_class"] = {n: (_finite(res.get(f"AP-{n}")) if n in with_gt else None) for n in class_names}
        return t

    if voc_year is not None:
        out["metric"] = "voc2007_11point" if voc_year == 2007 else "voc_area"
        out.update(task(dict(results.get("bbox") or {}), ("AP", "AP50", "AP75")))
    else:
        out["metric"] = "coco"
        out.update(task(dict(results.get("bbox") or {}), METRIC_KEYS))
        if "segm" in results:
            out["segm"] = task(dict(results["segm"] or {}), METRIC_KEYS)
    return out


def _write_results(cfg, job: D2Job, results: dict) -> None:
    from simsiam_kit.evaluation.detection.outputs import write_json

    out = {
        "engine": "detectron2",
        "config": job.config_file,
        "weights": job.weights_pkl or "random",
        "iters": cfg.SOLVER.MAX_ITER,
        "batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "norm": cfg.MODEL.RESNETS.NORM,
        "lr_steps": list(cfg.SOLVER.STEPS),
        "precise_bn_iters": cfg.TEST.PRECISE_BN.NUM_ITER if cfg.TEST.PRECISE_BN.ENABLED else 0,
        "num_gpus": job.num_gpus,
        "num_machines": job.num_machines,
    }
    out.update(
        summarize_results(
            results, job.class_names, job.classes_with_gt, job.val.year if job.val.kind == "voc" else None
        )
    )
    write_json(Path(job.output_dir) / "results.json", out)
    if job.vis_images > 0:
        _save_predictions(cfg, job)


def _load_val(job: D2Job) -> DetectionSet:
    from simsiam_kit.evaluation.detection.data import load_coco_json, load_voc

    if job.val.kind == "voc":
        return load_voc(Path(job.val.devkit), f"{job.val.year}/{job.val.split}", "voc_val", "--voc-val")
    return load_coco_json(Path(job.val.json_path), Path(job.val.images_dir))


def _save_predictions(cfg, job: D2Job) -> None:
    """Draw the trained model's boxes on the first few validation images (``DefaultPredictor``, BGR input)."""
    import numpy as np
    from detectron2.engine import DefaultPredictor
    from PIL import Image

    from simsiam_kit.data import to_rgb
    from simsiam_kit.evaluation.detection.visualize import save_predictions_png

    final = Path(cfg.OUTPUT_DIR) / "model_final.pth"
    if not final.is_file():
        return
    pcfg = cfg.clone()
    pcfg.defrost()
    pcfg.MODEL.WEIGHTS = str(final)
    pcfg.freeze()
    predictor = DefaultPredictor(pcfg)
    val = _load_val(job)
    recs = val.records[: job.vis_images]
    preds = []
    for rec in recs:
        with Image.open(rec["file"]) as im:
            bgr = np.asarray(to_rgb(im))[:, :, ::-1].copy()  # 16-bit grayscale scaled, not clipped
        inst = predictor(bgr)["instances"].to("cpu")
        preds.append(
            {
                "boxes": inst.pred_boxes.tensor.numpy(),
                "scores": inst.scores.numpy(),
                "labels": inst.pred_classes.numpy() + 1,
            }
        )
    save_predictions_png(recs, preds, val.class_names, Path(job.output_dir) / "predictions.png", 0.5, job.vis_images)


# ---------------------------------------------------------------------------------------------- entry


def check_launch(num_gpus: int, num_machines: int, machine_rank: int, dist_url: str, visible_gpus: int) -> None:
    """Refuse launcher options detectron2's ``launch`` would fail on later, or inside its workers."""
    if num_gpus < 1:
        raise UserError(f"--num-gpus {num_gpus}: expected >= 1")
    if num_gpus > max(visible_gpus, 1):
        raise UserError(
            f"--num-gpus {num_gpus}: this machine has {visible_gpus} visible CUDA GPU(s)"
            + (
                "; without a GPU the detectron2 engine runs one CPU process (--num-gpus 1)"
                if visible_gpus == 0
                else " (see CUDA_VISIBLE_DEVICES)"
            )
        )
    if num_machines < 1:
        raise UserError(f"--num-machines {num_machines}: expected >= 1")
    if not 0 <= machine_rank < num_machines:
        raise UserError(
            f"--machine-rank {machine_rank}: expected 0..{num_machines - 1} for --num-machines {num_machines}"
        )
    if num_machines > 1 and dist_url == "auto":
        raise UserError(
            f"--num-machines {num_machines} needs --dist-url tcp://HOST:PORT, the address of machine 0 "
            "(the same on every machine); 'auto' picks a local port and works on one machine only"
        )
    if num_machines > 1 and visible_gpus == 0:
        raise UserError(
            f"--num-machines {num_machines}: this machine has no visible CUDA GPU; the detectron2 "
            "engine runs several processes on GPUs only (SyncBN)"
        )


CHECKED_PKL = "weights_checked.pkl"


def load_weights_pkl(weights: str) -> Optional[dict]:
    """A ready ``.pkl`` given as ``--weights``, loaded by the restricted unpickler of
    :func:`simsiam_kit.detectron2_weights.load_detectron2_pkl` (numpy arrays and plain containers only;
    anything else is refused before it runs); None for any other ``--weights``. detectron2 itself loads
    ``.pkl`` files with ``pickle``, so it is never given the original file (:func:`weights_for_detectron2`)."""
    if not weights.endswith(".pkl"):
        return None
    from simsiam_kit.detectron2_weights import load_detectron2_pkl

    if not Path(weights).is_file():
        raise UserError(f"weights not found: {weights}")
    return load_detectron2_pkl(weights)


def check_backbone_fits(cfg, arch: Optional[str], what: str, config_name: str) -> None:
    """Refuse a config whose ResNet is not the backbone's, asking the backbone entry: its detectron2 depth
    (``MODEL.RESNETS.DEPTH``) and its first stage's channels (``MODEL.RESNETS.RES2_OUT_CHANNELS``).
    detectron2 would otherwise skip every tensor whose shape differs with only a warning and fine-tune
    a mostly random backbone. ``arch`` None (a ready ``.pkl``, random init without ``--arch``): nothing to ask.
    Configs with another backbone builder than detectron2's ResNets are not checked."""
    if arch is None or "resnet" not in str(cfg.MODEL.BACKBONE.NAME):
        return
    from simsiam_kit.models.backbones import get_backbone_entry

    entry = get_backbone_entry(arch)
    depth, res2 = cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS
    if entry.detectron2_depth is None:
        raise UserError(f"{what}: {arch} has no detectron2 backbone; use --engine torchvision")
    if entry.detectron2_depth != depth:
        raise UserError(
            f"{what}: a {arch} backbone, but {config_name} builds a ResNet-{depth} (MODEL.RESNETS.DEPTH {depth}): "
            f"use a config for depth {entry.detectron2_depth} or --set MODEL.RESNETS.DEPTH={entry.detectron2_depth}"
        )
    first = entry.stage_channels[0]
    if res2 != first:
        raise UserError(
            f"{what}: a {arch} backbone, whose first stage has {first} channels, but {config_name} sets "
            f"MODEL.RESNETS.RES2_OUT_CHANNELS {res2}: --set MODEL.RESNETS.RES2_OUT_CHANNELS={first}"
        )


def _backbone_to_convert(weights: str, checked_pkl: Optional[dict], log: Callable[[str], None]):
    """The backbone ``weights`` holds (read once: converted later, its entry asked first), or None for random
    init and a ready ``.pkl``."""
    if checked_pkl is not None or is_random(weights):
        return None
    from simsiam_kit.weights import load_backbone

    loaded = load_backbone(weights)
    if loaded.notice():
        log(loaded.notice())
    return loaded


def weights_for_detectron2(
    weights: str, checked_pkl: Optional[dict], out_dir: Path, log: Callable[[str], None], loaded=None
) -> str:
    """``MODEL.WEIGHTS``: "" for random init; for a ``.pkl``, a copy written from what the restricted
    unpickler accepted (``checked_pkl``, :func:`load_weights_pkl`) into ``out_dir``; anything else is
    converted into ``out_dir`` as ``backbone_detectron2.pkl`` (from ``loaded``, the backbone already read
    from ``weights``, when given)."""
    from simsiam_kit.detectron2_weights import convert_backbone, convert_weights, write_detectron2_pkl

    if is_random(weights):
        return ""  # detectron2's own random init
    if checked_pkl is not None:
        path = write_detectron2_pkl(checked_pkl, Path(out_dir) / CHECKED_PKL)
        log(
            f"{weights}: accepted by the restricted unpickler (numpy arrays and plain containers only); "
            f"detectron2 reads the copy written from it, {path}"
        )
        return str(path.resolve())
    pkl_path = Path(out_dir) / "backbone_detectron2.pkl"
    if loaded is None:
        convert_weights(weights, pkl_path, log=log)
    else:
        convert_backbone(loaded.model.state_dict(), loaded.arch, loaded.stem, loaded.source, pkl_path, log)
    return str(pkl_path.resolve())


def run_detectron2_detection(
    config: str,
    weights: str,
    data: DetectionData,
    out_dir: Path,
    iters: Optional[int] = None,
    overrides=None,
    num_gpus: int = 1,
    arch: Optional[str] = None,
    log: Callable[[str], None] = print,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
) -> Optional[dict]:
    """Convert weights, register data, train and evaluate with detectron2; returns ``results.json``'s content
    (None on a machine other than machine 0 of a multi-machine run: machine 0 writes the results)."""
    import torch

    check_launch(
        num_gpus, num_machines, machine_rank, dist_url, torch.cuda.device_count() if torch.cuda.is_available() else 0
    )
    checked_pkl = load_weights_pkl(weights)  # a hostile .pkl is refused up front, detectron2 or not
    require_detectron2()
    from detectron2.engine import launch

    cfg_path = resolve_config_path(config, "detection")
    out_dir = Path(out_dir)
    if (out_dir / "results.json").exists():
        raise UserError(f"{out_dir} already holds detection results; pick another --output")

    train = _d2_sets(data.train, out_dir, "--voc-train")
    val_sets = _d2_sets(data.val, out_dir, "--voc-val")
    if len(val_sets) != 1:
        raise UserError(
            f"--voc-val: the detectron2 engine scores one YEAR/SPLIT (detectron2's "
            f"PascalVOCDetectionEvaluator reads one split list), got {len(val_sets)}"
        )
    val = val_sets[0]
    if val.kind == "voc":
        _check_voc_for_evaluator(val)
    job = D2Job(
        str(cfg_path.resolve()),
        "",
        train,
        val,
        data.train.num_classes,
        data.val.class_names,
        _classes_with_ground_truth(data.val),
        str(out_dir.resolve()),
        list(overrides or []),
        iters,
        num_gpus,
        num_machines,
        machine_rank,
        dist_url,
    )
    cfg = build_cfg(job)  # every config/--set/--iters problem surfaces here, before any conversion or launch
    world = num_gpus * num_machines
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise UserError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by the {world} "
            "processes (--num-gpus x --num-machines); detectron2 splits the batch evenly"
        )
    if cfg.MODEL.MASK_ON:
        for ds, flag in ((data.train, "--voc-train / --train-json"), (data.val, "--voc-val / --val-json")):
            why = _mask_problem(ds, flag)
            if why:
                raise UserError(
                    f"{cfg_path.name} trains Mask R-CNN (MODEL.MASK_ON True), but {why}; use a box-only "
                    "config (d2_voc0712_R_50_C4_24k, d2_coco_R_18_FPN_quick) or --set MODEL.MASK_ON=False"
                )

    loaded = _backbone_to_convert(weights, checked_pkl, log)
    what = loaded.source if loaded else f"--arch {arch}"
    check_backbone_fits(cfg, loaded.arch if loaded else arch, what, cfg_path.name)

    out_dir.mkdir(parents=True, exist_ok=True)
    pkl = job.weights_pkl = weights_for_detectron2(weights, checked_pkl, out_dir, log, loaded)
    # COCO sets held in memory only are written out as COCO JSON for register_coco_instances
    for ds, sets in ((data.train, train), (data.val, [val])):
        if sets[0].kind == "coco" and ds.json_path is None:
            ds.write_json(Path(sets[0].json_path))
    log(
        f"detectron2: config {cfg_path}, weights {pkl or 'random init'}, {data.train.num_classes} classes, "
        f"{num_gpus} process(es) per machine x {num_machines} machine(s); {cfg.SOLVER.MAX_ITER} iterations, "
        f"LR steps {tuple(cfg.SOLVER.STEPS)}, precise BN "
        f"{cfg.TEST.PRECISE_BN.NUM_ITER if cfg.TEST.PRECISE_BN.ENABLED else 'off'}; "
        f"evaluation {'PascalVOCDetectionEvaluator' if val.kind == 'voc' else 'COCOEvaluator'}"
    )
    launch(_d2_main, num_gpus, num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url, args=(job,))
    if machine_rank != 0:
        log(f"machine {machine_rank} done; machine 0 writes the results")
        return None
    res_path = out_dir / "results.json"
    if not res_path.is_file():
        raise UserError(f"detectron2 finished without writing {res_path}; see the log in {out_dir}")
    return json.loads(res_path.read_text())
