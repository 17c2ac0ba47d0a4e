"""Detection transfer: data loading and validation, COCO metrics, the torchvision engine end to end on
real coco128 images, the detectron2 configs, and (when installed) the detectron2 engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from evaluation.detection.data import check_same_categories, load_coco_json, load_voc, resolve_data
from evaluation.detection.metrics import METRIC_KEYS, coco_evaluate
from evaluation.detection.torchvision_engine import (
    WarmupMultiStepLR, build_fpn_backbone, load_detection_config,
)
from simsiam_kit.cli import app
from simsiam_kit.engine.checkpoint import save_backbone, save_checkpoint
from simsiam_kit.errors import UserError
from simsiam_kit.models import build_backbone
from simsiam_kit.weights import load_backbone

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128_det"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"
needs_data = pytest.mark.skipif(not (DATA / "instances_train.json").is_file(), reason="shared/data/coco128_det missing")


def _subset_json(src: Path, dst: Path, n_images: int) -> Path:
    d = json.loads(src.read_text())
    annotated = sorted({a["image_id"] for a in d["annotations"]})[:n_images]
    d["images"] = [im for im in d["images"] if im["id"] in annotated]
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in annotated]
    dst.write_text(json.dumps(d))
    return dst


# ---------------------------------------------------------------------------------------------- metrics


def _gt(boxes_xywh, cats=((1, "a"), (2, "b"))):
    return {
        "images": [{"id": 1, "file_name": "x.jpg", "width": 200, "height": 200}],
        "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for i, (c, b) in enumerate(boxes_xywh)],
        "categories": [{"id": i, "name": n} for i, n in cats],
    }


def test_metrics_ground_truth_as_detections_is_perfect():
    gt = _gt([(1, [10, 10, 50, 50]), (1, [100, 100, 40, 60])])
    dets = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    res = coco_evaluate(gt, dets)
    assert res["AP"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)
    assert res["per_class"] == {"a": pytest.approx(100.0), "b": None}  # 'b' has no ground truth


def test_metrics_iou_062_counts_at_three_of_ten_thresholds():
    # GT [0,0,100,100]; detection [0,0,100,62] has IoU 0.62: a hit at IoU 0.50, 0.55, 0.60, a miss above,
    # so AP50 = 100, AP75 = 0 and AP (mean over 0.50:0.05:0.95) = 3/10 = 30
    gt = _gt([(1, [0, 0, 100, 100])])
    res = coco_evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 62], "score": 0.8}])
    assert res["AP50"] == pytest.approx(100.0)
    assert res["AP75"] == pytest.approx(0.0)
    assert res["AP"] == pytest.approx(30.0)
    assert set(METRIC_KEYS) <= set(res)
    assert coco_evaluate(gt, [])["AP"] == 0.0


def test_warmup_multistep_lr_by_hand():
    h = WarmupMultiStepLR(None, base_lr=0.1, warmup_iters=10, warmup_factor=0.0, steps=[20, 30], gamma=0.1)
    assert h.lr_at(0) == pytest.approx(0.0)
    assert h.lr_at(5) == pytest.approx(0.05)
    assert h.lr_at(10) == pytest.approx(0.1)
    assert h.lr_at(20) == pytest.approx(0.01)
    assert h.lr_at(35) == pytest.approx(0.001)


# ---------------------------------------------------------------------------------------------- data


@needs_data
def test_coco_json_loading():
    ds = load_coco_json(DATA / "instances_train.json", DATA / "images")
    assert len(ds.records) == 82 and ds.num_boxes == 532 and ds.num_classes == 80
    rec = next(r for r in ds.records if r["image_id"] == 9)
    # first annotation of image 9: bbox [1.08, 187.69, 611.59, 285.84], category 51 (bowl) -> xyxy, label
    np.testing.assert_allclose(rec["boxes"][0], [1.08, 187.69, 612.67, 473.53], rtol=0, atol=1e-3)
    cat_ids = [c["id"] for c in ds.categories]
    assert rec["labels"][0] == cat_ids.index(51) + 1
    assert ds.label_to_cat_id[80] == 90  # contiguous labels, original COCO ids kept for evaluation
    assert sum(len(r["boxes"]) == 0 for r in ds.records) == 2


@needs_data
def test_bad_coco_inputs(tmp_path):
    d = json.loads((DATA / "instances_val.json").read_text())
    d["images"][0]["file_name"] = "nope_000.jpg"
    (tmp_path / "missing.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="nope_000.jpg"):
        load_coco_json(tmp_path / "missing.json", DATA / "images")
    d = json.loads((DATA / "instances_val.json").read_text())
    d["annotations"] = []
    (tmp_path / "empty.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="'annotations' is empty"):
        load_coco_json(tmp_path / "empty.json", DATA / "images")
    d = json.loads((DATA / "instances_val.json").read_text())
    d["categories"][0]["name"] = "human"
    (tmp_path / "renamed.json").write_text(json.dumps(d))
    train = load_coco_json(DATA / "instances_train.json", DATA / "images")
    with pytest.raises(UserError, match="only in train: 1:person; only in val: 1:human"):
        check_same_categories(train, load_coco_json(tmp_path / "renamed.json", DATA / "images"))


@needs_data
def test_pascal_voc_layout(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    shutil.copy(DATA / "images" / "000000000009.jpg", root / "JPEGImages" / "000001.jpg")
    (root / "Annotations" / "000001.xml").write_text(
        "<annotation><size><width>640</width><height>480</height><depth>3</depth></size>"
        "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>110</xmax><ymax>220</ymax></bndbox></object>"
        "<object><name>person</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object>"
        "</annotation>")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n")
    ds = load_voc(tmp_path / "VOCdevkit", "2007/trainval")
    rec = ds.records[0]
    np.testing.assert_allclose(rec["boxes"][0], [10, 20, 110, 220])  # 1-based -> 0-based corners
    assert ds.class_names[rec["labels"][0] - 1] == "dog"
    assert list(rec["iscrowd"]) == [0, 1]  # 'difficult' is ignored by the COCO evaluation
    assert ds.coco["annotations"][0]["bbox"] == [10.0, 20.0, 100.0, 200.0]
    data = resolve_data(None, None, None, None, tmp_path / "VOCdevkit", "2007/trainval", "2007/trainval")
    assert data.train.num_classes == 20
    (root / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n")
    with pytest.raises(UserError, match="VOC2007/JPEGImages/000002.jpg"):
        load_voc(tmp_path / "VOCdevkit", "2007/test")


# ---------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("norm", ["bn", "syncbn", "frozen_bn"])
def test_fpn_backbone_loads_every_weight(norm, tmp_path):
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    bb = build_backbone("resnet18", "imagenet")
    with torch.no_grad():
        bb.bn1.running_mean.uniform_(-1, 1)
    save_backbone(tmp_path / "bb.pt", bb, "resnet18", "imagenet")
    fpn, report = build_fpn_backbone(load_backbone(str(tmp_path / "bb.pt")), norm, trainable_layers=3)
    assert report["missing"] == [] and report["unexpected"] == []
    body = fpn.body
    torch.testing.assert_close(body.layer3[1].conv2.weight, bb.layer3[1].conv2.weight)
    torch.testing.assert_close(body.bn1.running_mean, bb.bn1.running_mean)
    want = {"bn": torch.nn.BatchNorm2d, "syncbn": torch.nn.SyncBatchNorm, "frozen_bn": FrozenBatchNorm2d}[norm]
    assert type(body.bn1) is want
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad


def test_cifar_stem_refused_by_torchvision_engine(tmp_path):
    save_backbone(tmp_path / "c.pt", build_backbone("resnet18", "cifar"), "resnet18", "cifar")
    with pytest.raises(UserError, match="CIFAR stem"):
        build_fpn_backbone(load_backbone(str(tmp_path / "c.pt")), "bn", 5)


def test_torchvision_engine_rejects_detectron2_yaml():
    with pytest.raises(UserError, match="detectron2 config"):
        load_detection_config("d2_voc0712_R_50_C4_24k")
    with pytest.raises(UserError, match="model.norm"):
        load_detection_config("torchvision_quick", ["model.norm=gn"])


@needs_data
def test_torchvision_engine_trains_and_writes_results(tmp_path):
    torch.manual_seed(0)
    save_backbone(tmp_path / "bb.pt", build_backbone("resnet18", "imagenet"), "resnet18", "imagenet")
    train = _subset_json(DATA / "instances_train.json", tmp_path / "train.json", 4)
    val = _subset_json(DATA / "instances_val.json", tmp_path / "val.json", 2)
    out = tmp_path / "out"
    args = ["eval", "detection", "--weights", str(tmp_path / "bb.pt"), "--engine", "torchvision",
            "--config", "torchvision_quick", "--train-json", str(train), "--train-images", str(DATA / "images"),
            "--val-json", str(val), "--val-images", str(DATA / "images"), "--iters", "2", "--output", str(out)]
    small = ["model.min_size=96", "model.max_size=128", "solver.batch_size=2", "model.rpn_post_nms_top_n_train=64",
             "model.rpn_post_nms_top_n_test=32", "model.box_batch_size_per_image=32", "data.workers=0",
             "train.progress=false", "test.vis_images=2", "test.score_thresh=0.0"]
    r = CliRunner().invoke(app, args + sum((["--set", s] for s in small), []))
    assert r.exit_code == 0, r.output
    assert "0 missing" in r.output and "AP50" in r.output
    res = json.loads((out / "results.json").read_text())
    for k in METRIC_KEYS:
        assert 0.0 <= res[k] <= 100.0
    assert res["iters"] == 2 and res["backbone_load"]["missing"] == []
    assert res["backbone_load"]["loaded"] == res["backbone_load"]["backbone_keys"] == 100
    assert len(res["per_class"]) == 80 and res["per_class"]["person"] is not None
    assert res["num_detections"] > 0 and res["seconds_per_iter"] > 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["type"] == "epoch" and np.isfinite(steps[-1]["loss"])
    assert (out / "predictions.png").stat().st_size > 1000
    assert yaml.safe_load((out / "config.yaml").read_text())["solver"]["iters"] == 2
    # the same output directory is not overwritten
    r = CliRunner().invoke(app, args + sum((["--set", s] for s in small), []))
    assert r.exit_code == 2 and "already holds" in r.output


@needs_data
def test_cli_bad_inputs_exit_2(tmp_path):
    save_backbone(tmp_path / "c.pt", build_backbone("resnet18", "cifar"), "resnet18", "cifar")
    save_checkpoint(tmp_path / "heads.pt", model={"projector.0.weight": torch.zeros(2, 2)}, config={})
    d = json.loads((DATA / "instances_val.json").read_text())
    d["categories"] = d["categories"][:79]
    d["annotations"] = [a for a in d["annotations"] if a["category_id"] != 90]
    (tmp_path / "val79.json").write_text(json.dumps(d))
    base = ["eval", "detection", "--train-json", str(DATA / "instances_train.json"), "--train-images", str(DATA / "images"),
            "--val-images", str(DATA / "images"), "--output", str(tmp_path / "o")]
    cases = [
        (["--weights", str(tmp_path / "c.pt"), "--val-json", str(DATA / "instances_val.json")], "CIFAR stem"),
        (["--weights", str(tmp_path / "heads.pt"), "--val-json", str(DATA / "instances_val.json")], "no backbone"),
        (["--weights", "random", "--arch", "resnet18", "--val-json", str(tmp_path / "val79.json")], "categories differ"),
        (["--weights", "random", "--arch", "resnet18", "--val-json", str(tmp_path / "none.json")], "not found"),
        (["--weights", "random", "--arch", "resnet18", "--val-json", str(DATA / "instances_val.json"),
          "--engine", "mmdet"], "--engine"),
    ]
    for extra, msg in cases:
        r = CliRunner().invoke(app, base + extra + ["--set", "train.progress=false"])
        assert r.exit_code == 2, (extra, r.output)
        assert msg in r.output, (msg, r.output)
    assert not (tmp_path / "o" / "results.json").exists()


# ---------------------------------------------------------------------------------------------- detectron2


def _d2_yaml(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_detectron2_configs_follow_the_paper_protocol():
    base = _d2_yaml("Base-RCNN-C4-BN.yaml")
    m = base["MODEL"]
    # torchvision normalisation in 0-255 scale, RGB, torchvision Bottleneck striding, SyncBN, extra norm
    assert m["PIXEL_MEAN"] == pytest.approx([255 * 0.485, 255 * 0.456, 255 * 0.406])
    assert m["PIXEL_STD"] == pytest.approx([255 * 0.229, 255 * 0.224, 255 * 0.225])
    assert base["INPUT"]["FORMAT"] == "RGB" and m["RESNETS"]["STRIDE_IN_1X1"] is False
    assert m["RESNETS"]["NORM"] == "SyncBN" and m["BACKBONE"]["FREEZE_AT"] == 0
    assert m["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm"
    voc = _d2_yaml("d2_voc0712_R_50_C4_24k.yaml")
    assert voc["_BASE_"] == "Base-RCNN-C4-BN.yaml" and voc["SOLVER"]["MAX_ITER"] == 24000
    assert voc["SOLVER"]["STEPS"] == [18000, 22000] and voc["MODEL"]["MASK_ON"] is False
    coco = _d2_yaml("d2_coco_R_50_C4_1x.yaml")
    assert coco["MODEL"]["MASK_ON"] is True and coco["SOLVER"]["MAX_ITER"] == 90000
    r18 = _d2_yaml("d2_coco_R_18_FPN_quick.yaml")["MODEL"]
    assert r18["RESNETS"]["DEPTH"] == 18 and r18["RESNETS"]["RES2_OUT_CHANNELS"] == 64  # as the R18 fixture
    assert r18["PIXEL_MEAN"] == m["PIXEL_MEAN"] and r18["RESNETS"]["STRIDE_IN_1X1"] is False


def test_detectron2_engine_without_detectron2_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "detectron2" or name.startswith("detectron2."):
            raise ImportError("No module named 'detectron2'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from evaluation.detection.detectron2_engine import require_detectron2

    with pytest.raises(UserError, match="not published on PyPI.*git\\+https://github.com/facebookresearch/detectron2"):
        require_detectron2()


@needs_data
def test_detectron2_engine_r18_fpn_two_iterations(tmp_path):
    pytest.importorskip("detectron2")
    from evaluation.detection.detectron2_engine import run_detectron2_detection

    torch.manual_seed(0)
    save_backbone(tmp_path / "bb.pt", build_backbone("resnet18", "imagenet"), "resnet18", "imagenet")
    train = _subset_json(DATA / "instances_train.json", tmp_path / "train.json", 4)
    val = _subset_json(DATA / "instances_val.json", tmp_path / "val.json", 2)
    data = resolve_data(train, DATA / "images", val, DATA / "images", None, "", "")
    res = run_detectron2_detection(
        "d2_coco_R_18_FPN_quick", str(tmp_path / "bb.pt"), data, tmp_path / "out", iters=2,
        overrides=["SOLVER.IMS_PER_BATCH=2", "INPUT.MIN_SIZE_TRAIN=(128,)", "INPUT.MIN_SIZE_TEST=128",
                   "DATALOADER.NUM_WORKERS=0", "TEST.PRECISE_BN.ENABLED=False"], log=lambda s: None)
    for k in METRIC_KEYS:
        assert k in res
    assert res["engine"] == "detectron2" and res["iters"] == 2
    assert (tmp_path / "out" / "backbone_detectron2.pkl").is_file()


def test_detectron2_extra_norm_head_builds():
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from evaluation.detection.detectron2_engine import register_res5_extra_norm

    register_res5_extra_norm()
    register_res5_extra_norm()  # idempotent
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / "d2_voc0712_R_50_C4_24k.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model(cfg)
    assert "roi_heads.res5.norm.weight" in model.state_dict()
