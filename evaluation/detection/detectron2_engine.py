"""Detection transfer with detectron2: the protocol of the SimSiam paper (Table 5), which follows MoCo's
detection code: Faster R-CNN / Mask R-CNN R50-C4 with SyncBN everywhere, an extra norm after res5 in the
ROI head (:func:`register_res5_extra_norm`), RGB input with the torchvision pixel mean/std (0-255 scale)
and ``STRIDE_IN_1X1: False`` (torchvision's Bottleneck strides in the 3x3 conv). Configs are
detectron2's own YAML format, in ``configs/detection/d2_*.yaml``.

detectron2 is not on PyPI; it is imported inside the functions here, so this module imports without it.
Install it from source (``docs/detection.md``).

Flow: convert the backbone with :mod:`export.detectron2` (or take a ready ``.pkl``), register the COCO
JSON train/val sets (``register_coco_instances``; Pascal VOC is written out as COCO JSON first), build
the config (file, then dataset/weights/classes, then ``--set`` overrides, then ``--iters``), train with
``DefaultTrainer`` under detectron2's ``launch`` (one process per GPU), evaluate with ``COCOEvaluator``,
and write ``results.json`` in the same layout as the torchvision engine, plus ``predictions.png``.
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

from evaluation.detection.data import DetectionData

TRAIN_NAME = "simsiam_kit_det_train"
VAL_NAME = "simsiam_kit_det_val"
INSTALL_HINT = (
    "detectron2 is not installed (it is not published on PyPI). Install it from source, matching your torch: "
    "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
    "(see docs/detection.md), or use --engine torchvision"
)


def require_detectron2():
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


def register_datasets(train_json: str, train_images: str, val_json: str, val_images: str) -> None:
    """(Re-)register the train/val COCO-JSON sets under fixed names (every launched process does this)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    for name, js, im in ((TRAIN_NAME, train_json, train_images), (VAL_NAME, val_json, val_images)):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, js, im)


def _overrides_to_list(overrides) -> list:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set '{item}': expected KEY=VALUE (for example SOLVER.BASE_LR=0.01)")
        k, v = item.split("=", 1)
        out += [k.strip(), v]
    return out


@dataclass
class D2Job:
    config_file: str
    weights_pkl: str  # "" = random init
    train_json: str
    train_images: str
    val_json: str
    val_images: str
    num_classes: int
    output_dir: str
    overrides: list
    iters: Optional[int]
    num_gpus: int
    vis_images: int = 4


def build_cfg(job: D2Job):
    """detectron2 CfgNode: the YAML (with its ``_BASE_``), then data/weights/classes, then ``--set``, then ``--iters``."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(job.config_file)
    cfg.DATASETS.TRAIN = (TRAIN_NAME,)
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
    if job.iters is not None:
        old = cfg.SOLVER.MAX_ITER
        # keep the shape of the schedule: LR steps move with the length
        cfg.SOLVER.STEPS = tuple(max(1, int(round(s * job.iters / old))) for s in cfg.SOLVER.STEPS if s < old)
        cfg.SOLVER.MAX_ITER = job.iters
        cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, job.iters)
        cfg.SOLVER.CHECKPOINT_PERIOD = max(cfg.SOLVER.CHECKPOINT_PERIOD, job.iters)
    cfg.freeze()
    return cfg


def _make_trainer_class():
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator

    class COCOTrainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
            return COCOEvaluator(dataset_name, output_dir=folder)

    return COCOTrainer


def _d2_main(job: D2Job) -> None:
    """Runs in every process started by ``detectron2.engine.launch``."""
    from detectron2.engine import default_setup
    from detectron2.utils import comm

    register_res5_extra_norm()
    register_datasets(job.train_json, job.train_images, job.val_json, job.val_images)
    cfg = build_cfg(job)
    default_setup(cfg, argparse.Namespace(config_file=job.config_file, eval_only=False, resume=False,
                                          num_gpus=job.num_gpus, opts=job.overrides))
    Trainer = _make_trainer_class()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    # DefaultTrainer's EvalHook evaluates after the last iteration; fall back to an explicit test
    results = getattr(trainer, "_last_eval_results", None) or Trainer.test(cfg, trainer.model)
    if comm.is_main_process():
        _write_results(cfg, job, results)


def _write_results(cfg, job: D2Job, results: dict) -> None:
    from simsiam_kit.utils.io import atomic_write_json

    bbox = dict(results.get("bbox", {}))
    out = {"engine": "detectron2", "config": job.config_file, "weights": job.weights_pkl or "random",
           "iters": cfg.SOLVER.MAX_ITER, "batch_size": cfg.SOLVER.IMS_PER_BATCH, "norm": cfg.MODEL.RESNETS.NORM,
           "num_gpus": job.num_gpus}
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        v = bbox.get(k, float("nan"))
        out[k] = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
    out["per_class"] = {k[3:]: (None if math.isnan(v) else float(v)) for k, v in bbox.items() if k.startswith("AP-")}
    if "segm" in results:
        out["segm"] = {k: float(v) for k, v in results["segm"].items() if not k.startswith("AP-")}
    atomic_write_json(Path(job.output_dir) / "results.json", out)
    if job.vis_images > 0:
        _save_predictions(cfg, job)


def _save_predictions(cfg, job: D2Job) -> None:
    """Draw the trained model's boxes on the first few validation images (``DefaultPredictor``, BGR input)."""
    import numpy as np
    from detectron2.engine import DefaultPredictor
    from PIL import Image

    from evaluation.detection.data import load_coco_json
    from evaluation.detection.visualize import save_predictions_png

    final = Path(cfg.OUTPUT_DIR) / "model_final.pth"
    if not final.is_file():
        return
    pcfg = cfg.clone()
    pcfg.defrost()
    pcfg.MODEL.WEIGHTS = str(final)
    pcfg.freeze()
    predictor = DefaultPredictor(pcfg)
    val = load_coco_json(Path(job.val_json), Path(job.val_images))
    recs = val.records[: job.vis_images]
    preds = []
    for rec in recs:
        with Image.open(rec["file"]) as im:
            bgr = np.asarray(im.convert("RGB"))[:, :, ::-1].copy()
        inst = predictor(bgr)["instances"].to("cpu")
        preds.append({"boxes": inst.pred_boxes.tensor.numpy(), "scores": inst.scores.numpy(),
                      "labels": inst.pred_classes.numpy() + 1})
    save_predictions_png(recs, preds, val.class_names, Path(job.output_dir) / "predictions.png", 0.5, job.vis_images)


def run_detectron2_detection(config: str, weights: str, data: DetectionData, out_dir: Path, iters: Optional[int] = None,
                             overrides=None, num_gpus: int = 1, arch: Optional[str] = None,
                             log: Callable[[str], None] = print) -> dict:
    """Convert weights, register data, train and evaluate with detectron2; returns ``results.json``'s content."""
    require_detectron2()
    from detectron2.engine import launch

    cfg_path = resolve_config_path(config, "detection")
    out_dir = Path(out_dir)
    if (out_dir / "results.json").exists():
        raise UserError(f"{out_dir} already holds detection results; pick another --output")
    out_dir.mkdir(parents=True, exist_ok=True)
    if weights == "random":
        pkl = ""  # detectron2's own random init
    elif weights.endswith(".pkl"):
        if not Path(weights).is_file():
            raise UserError(f"weights not found: {weights}")
        pkl = str(Path(weights).resolve())
    else:
        from export.detectron2 import convert_weights

        pkl_path = out_dir / "backbone_detectron2.pkl"
        convert_weights(weights, pkl_path, log=log)
        pkl = str(pkl_path.resolve())
    # detectron2 reads COCO JSON; Pascal VOC (or anything without a file) is written out as COCO JSON
    for split in (data.train, data.val):
        if split.json_path is None:
            split.write_json(out_dir / f"{split.name}_coco.json")
    job = D2Job(str(cfg_path.resolve()), pkl, str(data.train.json_path), str(data.train.images_dir),
                str(data.val.json_path), str(data.val.images_dir), data.train.num_classes, str(out_dir.resolve()),
                list(overrides or []), iters, num_gpus)
    log(f"detectron2: config {cfg_path}, weights {pkl or 'random init'}, {data.train.num_classes} classes, "
        f"{num_gpus} GPU process(es)")
    launch(_d2_main, num_gpus, num_machines=1, machine_rank=0, dist_url="auto", args=(job,))
    res_path = out_dir / "results.json"
    if not res_path.is_file():
        raise UserError(f"detectron2 finished without writing {res_path}; see the log in {out_dir}")
    return json.loads(res_path.read_text())
