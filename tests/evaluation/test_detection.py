"""Detection transfer: data loading and validation, COCO metrics, the torchvision engine end to end on
real coco128 images, the detectron2 configs, and (when installed) the detectron2 engine."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from simsiam_kit.cli import app
from simsiam_kit.engine.checkpoint import save_backbone, save_checkpoint
from simsiam_kit.errors import UserError
from simsiam_kit.evaluation.detection.data import check_same_categories, load_coco_json, load_voc, resolve_data
from simsiam_kit.evaluation.detection.metrics import METRIC_KEYS, coco_evaluate
from simsiam_kit.evaluation.detection.torchvision_engine import (
    WarmupMultiStepLR,
    build_fpn_backbone,
    load_detection_config,
)
from simsiam_kit.models import build_backbone
from simsiam_kit.weights import load_backbone

from helpers import DATA, REPO, needs_shared

DATA = DATA / "coco128_det"
CONFIGS = REPO / "configs" / "detection"
needs_data = needs_shared(DATA / "instances_train.json")


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


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
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, (c, b) in enumerate(boxes_xywh)
        ],
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


def test_format_results_prints_null_nan_voc_and_mask_rows():
    from simsiam_kit.evaluation.detection.metrics import format_results

    # results.json written before NaN metrics became 0.0 held null: printed as '-', not a TypeError
    old = {
        "engine": "detectron2",
        "AP": None,
        "AP50": float("nan"),
        "AP75": 1.5,
        "APs": 0.0,
        "APm": 0.0,
        "APl": 0.0,
        "per_class": {"a": None, "b": 2.0},
    }
    text = format_results(old)
    assert "|      - |      - |   1.50 |" in text and "b 2.0" in text
    voc = format_results({"engine": "detectron2", "metric": "voc2007_11point", "AP": 50.0, "AP50": 80.0, "AP75": 55.0})
    assert "VOC2007 11-point" in voc and "APs" not in voc and "|  50.00 |  80.00 |  55.00 |" in voc
    segm = {k: 10.0 + i for i, k in enumerate(METRIC_KEYS)}
    both = format_results({**{k: 1.0 for k in METRIC_KEYS}, "segm": segm})
    assert "|    box |   1.00 |" in both and "|   mask |  10.00 |  11.00 |" in both


def test_summarize_detectron2_results_nan_as_torchvision_engine():
    from simsiam_kit.evaluation.detection.detectron2_engine import summarize_results

    nan = float("nan")
    # COCOEvaluator with no detection above the score threshold: every metric NaN, no per-class keys
    res = summarize_results({"bbox": {k: nan for k in METRIC_KEYS}}, ["a", "b", "c"], ["a", "c"])
    assert res["metric"] == "coco" and all(res[k] == 0.0 for k in METRIC_KEYS)
    assert res["per_class"] == {"a": 0.0, "b": None, "c": 0.0}  # as coco_evaluate([]) in the torchvision engine
    gt = _gt([(1, [10, 10, 50, 50])])
    tv = coco_evaluate(gt, [])
    assert {k: tv[k] for k in METRIC_KEYS} == {k: res[k] for k in METRIC_KEYS}
    json.dumps(res, allow_nan=False)  # strict JSON: no NaN, no crash when printed
    # Mask R-CNN: segm with the same keys; a class with no ground truth stays None however it scored
    r = summarize_results(
        {"bbox": {"AP": 12.5, "AP-a": 25.0, "AP-b": nan}, "segm": {"AP": 7.0, "AP-a": nan}}, ["a", "b"], ["a"]
    )
    assert r["AP"] == 12.5 and r["APs"] == 0.0 and r["per_class"] == {"a": 25.0, "b": None}
    assert r["segm"]["AP"] == 7.0 and r["segm"]["per_class"] == {"a": 0.0, "b": None}
    # PascalVOCDetectionEvaluator: AP, AP50, AP75 only, named as the VOC2007 metric
    v = summarize_results({"bbox": {"AP": 40.0, "AP50": 70.0, "AP75": 41.0, "AP-a": 33.0}}, ["a", "b"], ["a"], 2007)
    assert v["metric"] == "voc2007_11point" and "APs" not in v and v["AP50"] == 70.0
    assert v["per_class"] == {"a": 33.0, "b": None}


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
        "</annotation>"
    )
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n")
    ds = load_voc(tmp_path / "VOCdevkit", "2007/trainval")
    rec = ds.records[0]
    np.testing.assert_allclose(rec["boxes"][0], [10, 20, 110, 220])  # 1-based -> 0-based corners
    assert ds.class_names[rec["labels"][0] - 1] == "dog"
    # 'difficult' objects are trained on, as detectron2's pascal_voc loader does (the paper's protocol) ...
    assert list(rec["iscrowd"]) == [0, 0] and list(rec["difficult"]) == [0, 1]
    # ... and ignored by the evaluation: crowd in the COCO ground truth, which pycocotools skips
    assert [a["iscrowd"] for a in ds.coco["annotations"]] == [0, 1]
    assert ds.coco["annotations"][0]["bbox"] == [10.0, 20.0, 100.0, 200.0]
    assert ds.voc_splits == [("2007", "trainval")]
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
    with pytest.raises(UserError, match="cifar stem"):
        build_fpn_backbone(load_backbone(str(tmp_path / "c.pt")), "bn", 5)


def test_fpn_backbone_taps_the_entrys_stages(tmp_path):
    """ResNet-50: the FPN's inputs are the entry's four stages with their channels (256..2048, where the
    ResNet-18 of the test above has 64..512); trainable_layers counts stages from the top, then the stem."""
    from simsiam_kit.evaluation.detection.torchvision_engine import trainable_groups
    from simsiam_kit.models.backbones import get_backbone_entry

    torch.manual_seed(0)
    save_backbone(tmp_path / "bb.pt", build_backbone("resnet50", "imagenet"), "resnet50", "imagenet")
    loaded = load_backbone(str(tmp_path / "bb.pt"))
    fpn, report = build_fpn_backbone(loaded, "frozen_bn", trainable_layers=5)
    assert report["missing"] == [] and report["backbone_keys"] == report["loaded"]
    assert [b[0].in_channels for b in fpn.fpn.inner_blocks] == [256, 512, 1024, 2048]
    feats = fpn(torch.zeros(1, 3, 64, 64))
    assert [tuple(v.shape[-2:]) for v in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert all(p.requires_grad for p in fpn.body.parameters())
    assert trainable_groups(get_backbone_entry("resnet18")) == [
        ("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1")
    ]  # fmt: skip
    fpn, _ = build_fpn_backbone(loaded, "bn", trainable_layers=0)
    assert not any(p.requires_grad for p in fpn.body.parameters())
    with pytest.raises(UserError, match=r"model.trainable_layers 6: resnet50 has 5 groups to train.*0\.\.5"):
        build_fpn_backbone(loaded, "bn", trainable_layers=6)
    with pytest.raises(UserError, match=r"model.trainable_layers.*expected 0\.\.5"):
        load_detection_config("torchvision_quick", ["model.trainable_layers=6"])


def test_fpn_refuses_a_stem_without_its_strides_naming_the_one_that_fits(tmp_path):
    save_backbone(tmp_path / "s.pt", build_backbone("resnet18", "solo-cifar"), "resnet18", "solo-cifar")
    with pytest.raises(UserError, match=r"solo-cifar stem \(3x3/1 conv, no max-pool\).*strides \[1, 2, 4, 8\]"
                       r".*model.stem=imagenet$"):  # fmt: skip
        build_fpn_backbone(load_backbone(str(tmp_path / "s.pt")), "bn", 5)


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
    args = [
        "eval",
        "detection",
        "--weights",
        str(tmp_path / "bb.pt"),
        "--engine",
        "torchvision",
        "--config",
        "torchvision_quick",
        "--train-json",
        str(train),
        "--train-images",
        str(DATA / "images"),
        "--val-json",
        str(val),
        "--val-images",
        str(DATA / "images"),
        "--iters",
        "2",
        "--output",
        str(out),
    ]
    small = [
        "model.min_size=96",
        "model.max_size=128",
        "solver.batch_size=2",
        "model.rpn_post_nms_top_n_train=64",
        "model.rpn_post_nms_top_n_test=32",
        "model.box_batch_size_per_image=32",
        "data.workers=0",
        "train.progress=false",
        "test.vis_images=2",
        "test.score_thresh=0.0",
    ]
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
    for name in ("results.json", "coco_detections.json", "config.yaml"):  # not mkstemp's 0600
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name
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
    base = [
        "eval",
        "detection",
        "--train-json",
        str(DATA / "instances_train.json"),
        "--train-images",
        str(DATA / "images"),
        "--val-images",
        str(DATA / "images"),
        "--output",
        str(tmp_path / "o"),
    ]
    cases = [
        (["--weights", str(tmp_path / "c.pt"), "--val-json", str(DATA / "instances_val.json")], "cifar stem"),
        (["--weights", str(tmp_path / "heads.pt"), "--val-json", str(DATA / "instances_val.json")], "no backbone"),
        (
            ["--weights", "random", "--arch", "resnet18", "--val-json", str(tmp_path / "val79.json")],
            "categories differ",
        ),
        (["--weights", "random", "--arch", "resnet18", "--val-json", str(tmp_path / "none.json")], "not found"),
        (
            [
                "--weights",
                "random",
                "--arch",
                "resnet18",
                "--val-json",
                str(DATA / "instances_val.json"),
                "--engine",
                "mmdet",
            ],
            "--engine",
        ),
    ]
    for extra, msg in cases:
        r = CliRunner().invoke(app, base + extra + ["--set", "train.progress=false"])
        assert r.exit_code == 2, (extra, r.output)
        assert msg in r.output, (msg, r.output)
    assert not (tmp_path / "o" / "results.json").exists()


# ---------------------------------------------------------------------------------------------- detectron2


D2_CONFIGS = (
    "Base-RCNN-C4-BN.yaml",
    "d2_coco_R_18_FPN_quick.yaml",
    "d2_coco_R_50_C4_1x.yaml",
    "d2_voc0712_R_50_C4_24k.yaml",
)
# (SOLVER.STEPS, SOLVER.MAX_ITER) of each config; the base inherits detectron2's defaults (30000,) / 40000
D2_SCHEDULES = {
    "Base-RCNN-C4-BN.yaml": ((30000,), 40000),
    "d2_coco_R_18_FPN_quick.yaml": ((3000, 3600), 4000),
    "d2_coco_R_50_C4_1x.yaml": ((60000, 80000), 90000),
    "d2_voc0712_R_50_C4_24k.yaml": ((18000, 22000), 24000),
}


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
    for name in D2_CONFIGS:  # without VERSION, detectron2 warns at every run
        assert _d2_yaml(name)["VERSION"] == 2, name


def test_detectron2_engine_without_detectron2_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "detectron2" or name.startswith("detectron2."):
            raise ImportError("No module named 'detectron2'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from simsiam_kit.evaluation.detection.detectron2_engine import require_detectron2

    with pytest.raises(
        UserError,
        match="not published on PyPI.*setuptools<81.*git clone "
        "https://github.com/facebookresearch/detectron2.git && pip install --no-build-isolation",
    ):
        require_detectron2()


def test_scale_steps_fit_detectron2_scheduler_for_every_short_run():
    """fvcore's MultiStepParamScheduler (behind detectron2's build_lr_scheduler) needs steps strictly
    increasing and strictly inside (0, iters); the old proportional rounding gave (2, 2) for --iters 2."""
    from simsiam_kit.evaluation.detection.detectron2_engine import scale_steps

    for name, (steps, max_iter) in D2_SCHEDULES.items():
        yaml_solver = _d2_yaml(name).get("SOLVER", {})
        assert tuple(yaml_solver.get("STEPS", steps)) == steps and yaml_solver.get("MAX_ITER", max_iter) == max_iter
        for iters in list(range(1, 501)) + [max_iter // 10, max_iter, 2 * max_iter]:
            got = scale_steps(steps, max_iter, iters)
            assert all(0 < s < iters for s in got), (name, iters, got)
            assert all(a < b for a, b in zip(got, got[1:])), (name, iters, got)
            assert len(got) + 1 <= iters  # fvcore: num_updates >= number of values
            if iters >= 50:  # long enough: every decay kept, at its fraction of the run
                assert got == tuple(int(s * iters / max_iter + 0.5) for s in steps), (name, iters, got)
    voc = D2_SCHEDULES["d2_voc0712_R_50_C4_24k.yaml"]
    assert scale_steps(*voc, 1) == () and scale_steps(*voc, 2) == (1,) and scale_steps(*voc, 3) == (2,)
    assert scale_steps(*voc, 10) == (8, 9) and scale_steps(*voc, 2400) == (1800, 2200)
    assert scale_steps(*voc, 24000) == (18000, 22000)
    assert scale_steps((100, 200, 300), 300, 30) == (10, 20)  # a step at the old end never acts: dropped


def test_launcher_options_refused_up_front():
    from simsiam_kit.evaluation.detection.detectron2_engine import check_launch

    check_launch(1, 1, 0, "auto", visible_gpus=0)  # CPU: one process
    check_launch(8, 2, 1, "tcp://10.0.0.1:29500", visible_gpus=8)
    cases = [
        ((2, 1, 0, "auto", 0), "--num-gpus 2: this machine has 0 visible CUDA GPU"),
        ((4, 1, 0, "auto", 2), "--num-gpus 4: this machine has 2 visible CUDA GPU"),
        ((0, 1, 0, "auto", 2), "--num-gpus 0"),
        ((1, 2, 0, "auto", 1), "needs --dist-url tcp://HOST:PORT"),
        ((1, 2, 2, "tcp://h:1", 1), "--machine-rank 2: expected 0..1"),
        ((1, 2, 0, "tcp://h:1", 0), "no visible CUDA GPU"),
    ]
    for args, msg in cases:
        with pytest.raises(UserError, match=msg.replace("(", r"\(")):
            check_launch(*args[:4], visible_gpus=args[4])


def test_detectron2_config_must_build_the_backbones_resnet():
    """The entry's facts against MODEL.RESNETS (a stand-in for detectron2's CfgNode: only these keys are read)."""
    from types import SimpleNamespace

    from simsiam_kit.evaluation.detection.detectron2_engine import check_backbone_fits

    def cfg(depth, res2, name="build_resnet_fpn_backbone"):
        return SimpleNamespace(
            MODEL=SimpleNamespace(
                BACKBONE=SimpleNamespace(NAME=name), RESNETS=SimpleNamespace(DEPTH=depth, RES2_OUT_CHANNELS=res2)
            )
        )

    check_backbone_fits(cfg(18, 64), "resnet18", "bb.pt", "r18.yaml")
    check_backbone_fits(cfg(50, 256), "resnet50", "bb.pt", "r50.yaml")
    check_backbone_fits(cfg(18, 64), None, "x.pkl", "r18.yaml")  # a ready .pkl: no entry to ask
    check_backbone_fits(cfg(18, 64, "build_vit_backbone"), "resnet50", "bb.pt", "vit.yaml")  # not a ResNet config
    with pytest.raises(UserError, match=r"^bb.pt: a resnet50 backbone, but r18.yaml builds a ResNet-18 .*DEPTH=50$"):
        check_backbone_fits(cfg(18, 64), "resnet50", "bb.pt", "r18.yaml")
    with pytest.raises(UserError, match=r"first stage has 64 channels.*RES2_OUT_CHANNELS 256: --set .*=64$"):
        check_backbone_fits(cfg(34, 256), "resnet34", "bb.pt", "r34.yaml")
    with pytest.raises(UserError, match="--arch resnet101: a resnet101 backbone, but r50.yaml builds a ResNet-50"):
        check_backbone_fits(cfg(50, 256), "resnet101", "--arch resnet101", "r50.yaml")


@needs_data
def test_detectron2_cli_refuses_a_config_of_another_depth_before_writing(tmp_path):
    pytest.importorskip("detectron2")
    save_backbone(tmp_path / "bb.pt", build_backbone("resnet50", "imagenet"), "resnet50", "imagenet")
    base = ["eval", "detection", "--engine", "detectron2", "--config", "d2_coco_R_18_FPN_quick", "--iters", "1"]
    data = ["--train-json", str(DATA / "instances_train.json"), "--train-images", str(DATA / "images")]
    data += ["--val-json", str(DATA / "instances_val.json"), "--val-images", str(DATA / "images")]
    for weights, what in (([str(tmp_path / "bb.pt")], str(tmp_path / "bb.pt")),
                          (["random", "--arch", "resnet50"], "--arch resnet50")):  # fmt: skip
        r = CliRunner().invoke(app, base + ["--weights", *weights, *data, "--output", str(tmp_path / "o")])
        assert r.exit_code == 2, r.output
        assert f"{what}: a resnet50 backbone, but d2_coco_R_18_FPN_quick.yaml builds a ResNet-18" in r.output
        assert not (tmp_path / "o").exists()


@needs_data
def test_cli_refuses_gpus_the_machine_lacks(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = [
        "eval",
        "detection",
        "--weights",
        "random",
        "--arch",
        "resnet18",
        "--train-json",
        str(DATA / "instances_train.json"),
        "--train-images",
        str(DATA / "images"),
        "--val-json",
        str(DATA / "instances_val.json"),
        "--val-images",
        str(DATA / "images"),
        "--output",
        str(tmp_path / "o"),
    ]
    r = CliRunner().invoke(app, base + ["--engine", "detectron2", "--num-gpus", "2"])
    assert r.exit_code == 2 and "--num-gpus 2: this machine has 0 visible CUDA GPU" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(app, base + ["--engine", "torchvision", "--num-machines", "2"])
    assert r.exit_code == 2 and "torchvision engine runs one process" in r.output
    assert not (tmp_path / "o").exists()


def test_outputs_follow_the_umask(tmp_path):
    from simsiam_kit.evaluation.detection.outputs import write_bytes, write_json

    old = os.umask(0o027)
    try:
        assert write_json(tmp_path / "r.json", {"a": 1}).stat().st_mode & 0o777 == 0o640
        assert write_bytes(tmp_path / "w.pkl", b"x").stat().st_mode & 0o777 == 0o640
        os.umask(0o022)
        assert write_json(tmp_path / "r.json", {"a": 2}).stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 2}


def _write_voc_devkit(root: Path, splits: dict, difficult_every: int = 3) -> Path:
    """A VOCdevkit (VOC2007) from coco128 images: COCO classes that exist in VOC, integer 1-based corners,
    every ``difficult_every``-th object difficult, <pose>/<truncated> as detectron2's evaluator reads them."""
    coco_to_voc = {
        "airplane": "aeroplane",
        "bicycle": "bicycle",
        "bird": "bird",
        "boat": "boat",
        "bottle": "bottle",
        "bus": "bus",
        "car": "car",
        "cat": "cat",
        "chair": "chair",
        "cow": "cow",
        "dining table": "diningtable",
        "dog": "dog",
        "horse": "horse",
        "motorcycle": "motorbike",
        "person": "person",
        "potted plant": "pottedplant",
        "sheep": "sheep",
        "couch": "sofa",
        "train": "train",
        "tv": "tvmonitor",
    }
    d = json.loads((DATA / "instances_train.json").read_text())
    cat_name = {c["id"]: c["name"] for c in d["categories"]}
    per_image: dict = {}
    for a in d["annotations"]:
        if cat_name[a["category_id"]] in coco_to_voc and a["bbox"][2] >= 2 and a["bbox"][3] >= 2:
            per_image.setdefault(a["image_id"], []).append(a)
    images = [im for im in d["images"] if im["id"] in per_image]
    base = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    k, n_obj = 0, 0
    for split, n in splits.items():
        ids = []
        for im in images[k : k + n]:
            stem = f"{im['id']:06d}"
            shutil.copy(DATA / "images" / im["file_name"], base / "JPEGImages" / f"{stem}.jpg")
            objs = ""
            for a in per_image[im["id"]]:
                x, y, w, h = a["bbox"]
                x1, y1 = int(x) + 1, int(y) + 1
                x2, y2 = min(int(x + w), im["width"]), min(int(y + h), im["height"])
                n_obj += 1
                objs += (
                    f"<object><name>{coco_to_voc[cat_name[a['category_id']]]}</name><pose>Unspecified</pose>"
                    f"<truncated>0</truncated><difficult>{int(n_obj % difficult_every == 0)}</difficult><bndbox>"
                    f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                )
            (base / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><filename>{stem}.jpg</filename><size><width>{im['width']}</width><height>{im['height']}"
                f"</height><depth>3</depth></size>{objs}</annotation>"
            )
            ids.append(stem)
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        k += n
    return root


D2_SMALL = [
    "SOLVER.IMS_PER_BATCH=2",
    "INPUT.MIN_SIZE_TRAIN=(96,)",
    "INPUT.MAX_SIZE_TRAIN=160",
    "INPUT.MIN_SIZE_TEST=96",
    "INPUT.MAX_SIZE_TEST=160",
    "DATALOADER.NUM_WORKERS=0",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=16",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN=32",
    "MODEL.RPN.POST_NMS_TOPK_TEST=8",
]


def _sets(items) -> list:
    return sum((["--set", s] for s in items), [])


@pytest.fixture(autouse=True)
def _fresh_detectron2_logging():
    """detectron2's setup_logger (cached) binds its handlers to the stdout of the first run; under CliRunner
    that stream is closed afterwards. Drop them after each test so the next run sets up its own."""
    yield
    import logging
    import sys

    if "detectron2.utils.logger" not in sys.modules:
        return
    from detectron2.utils.logger import setup_logger

    setup_logger.cache_clear()
    for name in ("detectron2", "d2", "fvcore"):
        logging.getLogger(name).handlers.clear()


def _d2_job(config: str, iters=None, overrides=()):
    from simsiam_kit.evaluation.detection.detectron2_engine import D2Data, D2Job

    return D2Job(
        str(CONFIGS / config),
        "",
        [D2Data("coco", "x.json", "img")],
        D2Data("coco", "y.json", "img"),
        80,
        [f"c{i}" for i in range(80)],
        [],
        "/tmp/unused",
        list(overrides),
        iters,
        1,
    )


def test_detectron2_lr_scheduler_accepts_every_short_run():
    """detectron2's own build_lr_scheduler on the configs as the engine builds them, --iters 1..300."""
    pytest.importorskip("detectron2")
    from detectron2.solver import build_lr_scheduler

    from simsiam_kit.evaluation.detection.detectron2_engine import build_cfg

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    for name in D2_CONFIGS:
        for iters in list(range(1, 301)) + [D2_SCHEDULES[name][1]]:
            cfg = build_cfg(_d2_job(name, iters))
            assert cfg.SOLVER.MAX_ITER == iters
            sched = build_lr_scheduler(cfg, opt)  # raised ValueError for --iters 1-6 before
            assert sched is not None
            assert cfg.TEST.PRECISE_BN.NUM_ITER == min(200, iters)  # precise BN capped at the run
        assert tuple(cfg.SOLVER.STEPS) == D2_SCHEDULES[name][0]  # the full schedule is the config's own


def test_detectron2_cfg_explicit_overrides_and_bad_steps():
    pytest.importorskip("detectron2")
    from simsiam_kit.evaluation.detection.detectron2_engine import build_cfg

    cfg = build_cfg(_d2_job("d2_voc0712_R_50_C4_24k.yaml", 1000, ["TEST.PRECISE_BN.NUM_ITER=7", "SOLVER.STEPS=(300,)"]))
    assert cfg.TEST.PRECISE_BN.NUM_ITER == 7 and tuple(cfg.SOLVER.STEPS) == (300,)  # --set wins over --iters
    assert build_cfg(_d2_job("d2_voc0712_R_50_C4_24k.yaml")).TEST.PRECISE_BN.NUM_ITER == 200  # full run: default
    for bad in (["SOLVER.STEPS=(5,5)"], ["SOLVER.STEPS=(6,4)"], ["SOLVER.STEPS=(0,)"], ["SOLVER.STEPS=(10,)"]):
        with pytest.raises(UserError, match="must be strictly increasing and inside"):
            build_cfg(_d2_job("d2_coco_R_18_FPN_quick.yaml", 10, bad))


def test_detectron2_writers_without_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("detectron2")
    import importlib.util

    from detectron2.utils.events import TensorboardXWriter

    from simsiam_kit.evaluation.detection.detectron2_engine import training_writers

    real = importlib.util.find_spec

    def find_spec(tensorboard_spec):
        return lambda name, *a: tensorboard_spec if name == "tensorboard" else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec(None))
    writers = training_writers(str(tmp_path), 10)
    assert writers and not any(isinstance(w, TensorboardXWriter) for w in writers)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec(object()))
    assert any(isinstance(w, TensorboardXWriter) for w in training_writers(str(tmp_path), 10))


@needs_data
@pytest.mark.parametrize("iters", [1, 2])
def test_detectron2_engine_r18_fpn_short_runs_through_cli(tmp_path, iters):
    """R18-FPN quick from a backbone file through the CLI: the short schedules train (LR steps), precise BN
    runs capped at the run, and a run without any detection above the threshold (COCOEvaluator: NaN AP)
    writes 0.0 like the torchvision engine and prints its table."""
    pytest.importorskip("detectron2")
    torch.manual_seed(0)
    save_backbone(tmp_path / "bb.pt", build_backbone("resnet18", "imagenet"), "resnet18", "imagenet")
    train = _subset_json(DATA / "instances_train.json", tmp_path / "train.json", 4)
    val = _subset_json(DATA / "instances_val.json", tmp_path / "val.json", 2)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app,
        [
            "eval",
            "detection",
            "--weights",
            str(tmp_path / "bb.pt"),
            "--engine",
            "detectron2",
            "--config",
            "d2_coco_R_18_FPN_quick",
            "--train-json",
            str(train),
            "--train-images",
            str(DATA / "images"),
            "--val-json",
            str(val),
            "--val-images",
            str(DATA / "images"),
            "--iters",
            str(iters),
            "--output",
            str(out),
            *_sets(D2_SMALL + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST=1.0"]),
        ],
    )  # no score reaches 1.0: no detection
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["engine"] == "detectron2" and res["iters"] == iters and res["metric"] == "coco"
    assert res["lr_steps"] == ([] if iters == 1 else [1]) and res["precise_bn_iters"] == iters
    assert all(res[k] == 0.0 for k in METRIC_KEYS)
    with_gt = {n for n, v in res["per_class"].items() if v is not None}
    assert with_gt and all(res["per_class"][n] == 0.0 for n in with_gt) and len(res["per_class"]) == 80
    assert "|   0.00 |   0.00 |" in r.output and "results:" in r.output
    assert (out / "backbone_detectron2.pkl").is_file()
    for name in ("results.json", "backbone_detectron2.pkl"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name


@needs_data
def test_detectron2_voc_trains_on_difficult_and_scores_with_voc_evaluator(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    from simsiam_kit.evaluation.detection.data import VOC_CLASSES
    from simsiam_kit.evaluation.detection.detectron2_engine import D2Data, register_datasets

    root = _write_voc_devkit(tmp_path / "VOCdevkit", {"trainval": 4, "test": 3})
    # the engine registers VOC with detectron2's own loader: difficult objects are in the training set
    names = register_datasets(
        [D2Data("voc", devkit=str(root), year=2007, split="trainval")],
        D2Data("voc", devkit=str(root), year=2007, split="test"),
    )
    dicts = DatasetCatalog.get(names[0])
    ours = load_voc(root, "2007/trainval")
    n_difficult = int(sum(r["difficult"].sum() for r in ours.records))
    assert n_difficult > 0
    assert sum(len(d["annotations"]) for d in dicts) == ours.num_boxes
    assert sum(int((r["iscrowd"] == 0).sum()) for r in ours.records) == ours.num_boxes  # torchvision engine too
    ref = load_voc_instances(str(root / "VOC2007"), "trainval", VOC_CLASSES)
    assert [len(d["annotations"]) for d in dicts] == [len(d["annotations"]) for d in ref]

    torch.manual_seed(0)
    save_backbone(tmp_path / "bb.pt", build_backbone("resnet50", "imagenet"), "resnet50", "imagenet")
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app,
        [
            "eval",
            "detection",
            "--weights",
            str(tmp_path / "bb.pt"),
            "--engine",
            "detectron2",
            "--config",
            "d2_voc0712_R_50_C4_24k",
            "--voc-root",
            str(root),
            "--voc-train",
            "2007/trainval",
            "--voc-val",
            "2007/test",
            "--iters",
            "2",
            "--output",
            str(out),
            *_sets(D2_SMALL + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.0"]),
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "voc2007_11point" and "PascalVOCDetectionEvaluator" in r.output
    assert set(METRIC_KEYS[:3]) <= set(res) and "APs" not in res
    assert all(0.0 <= res[k] <= 100.0 for k in METRIC_KEYS[:3])
    assert len(res["per_class"]) == 20 and any(v is not None for v in res["per_class"].values())
    assert res["norm"] == "SyncBN" and res["precise_bn_iters"] == 2


@needs_data
def test_detectron2_voc_refusals(tmp_path):
    pytest.importorskip("detectron2")
    root = _write_voc_devkit(tmp_path / "VOCdevkit", {"trainval": 2, "test": 2, "one": 1})
    base = [
        "eval",
        "detection",
        "--weights",
        "random",
        "--engine",
        "detectron2",
        "--voc-root",
        str(root),
        "--voc-train",
        "2007/trainval",
        "--output",
        str(tmp_path / "o"),
        "--iters",
        "1",
        *_sets(D2_SMALL),
    ]
    xml = next((root / "VOC2007" / "Annotations").glob("*.xml"))
    cases = [
        (["--voc-val", "2007/test,2007/trainval"], "scores one YEAR/SPLIT"),
        (["--voc-val", "2007/one"], "needs at least 2 images"),
        (
            ["--voc-val", "2007/test", "--config", "d2_coco_R_50_C4_1x"],
            "Pascal VOC (--voc-train / --train-json) has boxes only",
        ),
    ]
    for extra, msg in cases:
        r = CliRunner().invoke(app, base + extra)
        assert r.exit_code == 2 and msg in r.output, (extra, r.output)
        assert len(r.output.strip().splitlines()) == 1
    test_ids = (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()
    xml = root / "VOC2007" / "Annotations" / f"{test_ids[0]}.xml"
    xml.write_text(xml.read_text().replace("<pose>Unspecified</pose>", ""))
    r = CliRunner().invoke(app, base + ["--voc-val", "2007/test"])
    assert r.exit_code == 2 and "PascalVOCDetectionEvaluator cannot read it" in r.output and xml.name in r.output
    assert not (tmp_path / "o").exists()


@needs_data
def test_detectron2_mask_rcnn_refused_on_boxes_and_mask_ap_printed(tmp_path):
    pytest.importorskip("detectron2")
    base = [
        "eval",
        "detection",
        "--weights",
        "random",
        "--engine",
        "detectron2",
        "--config",
        "d2_coco_R_50_C4_1x",
        "--train-images",
        str(DATA / "images"),
        "--val-images",
        str(DATA / "images"),
    ]
    r = CliRunner().invoke(
        app,
        base
        + [
            "--train-json",
            str(DATA / "instances_train.json"),
            "--val-json",
            str(DATA / "instances_val.json"),
            "--output",
            str(tmp_path / "o"),
            "--iters",
            "1",
            *_sets(D2_SMALL),
        ],
    )
    assert r.exit_code == 2, r.output
    assert "trains Mask R-CNN (MODEL.MASK_ON True), but" in r.output and "without a 'segmentation' mask" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()

    def with_masks(src, dst, n):  # rectangle polygons from the boxes
        _subset_json(src, dst, n)
        d = json.loads(dst.read_text())
        for a in d["annotations"]:
            x, y, w, h = a["bbox"]
            a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        dst.write_text(json.dumps(d))
        return dst

    torch.manual_seed(0)
    save_backbone(tmp_path / "bb.pt", build_backbone("resnet50", "imagenet"), "resnet50", "imagenet")
    train = with_masks(DATA / "instances_train.json", tmp_path / "train.json", 2)
    val = with_masks(DATA / "instances_val.json", tmp_path / "val.json", 2)
    out = tmp_path / "out"
    args = base + ["--train-json", str(train), "--val-json", str(val), "--iters", "1", "--output", str(out)]
    args[args.index("random")] = str(tmp_path / "bb.pt")
    r = CliRunner().invoke(app, args + _sets(D2_SMALL + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.0"]))
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert set(METRIC_KEYS) <= set(res["segm"]) and len(res["segm"]["per_class"]) == 80
    assert "|    box |" in r.output and "|   mask |" in r.output


def test_detectron2_launch_gets_multi_machine_options(tmp_path, monkeypatch):
    pytest.importorskip("detectron2")
    import detectron2.engine

    from simsiam_kit.evaluation.detection.detectron2_engine import run_detectron2_detection

    calls = []
    monkeypatch.setattr(detectron2.engine, "launch", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    data = resolve_data(
        DATA / "instances_train.json", DATA / "images", DATA / "instances_val.json", DATA / "images", None, "", ""
    )
    res = run_detectron2_detection(
        "d2_coco_R_18_FPN_quick",
        "random",
        data,
        tmp_path / "o",
        iters=10,
        num_gpus=4,
        num_machines=2,
        machine_rank=1,
        dist_url="tcp://10.0.0.1:29500",
        log=lambda s: None,
    )
    assert res is None  # machine 0 writes the results
    (fn, num_gpus), kw = calls[0]
    assert num_gpus == 4 and kw["num_machines"] == 2 and kw["machine_rank"] == 1
    assert kw["dist_url"] == "tcp://10.0.0.1:29500"
    job = kw["args"][0]
    assert (job.num_machines, job.machine_rank, job.iters) == (2, 1, 10)
    with pytest.raises(UserError, match="not divisible by the 12 processes"):  # 8 images over 6 GPUs x 2 machines
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 6)
        run_detectron2_detection(
            "d2_coco_R_18_FPN_quick",
            "random",
            data,
            tmp_path / "o2",
            num_gpus=6,
            num_machines=2,
            dist_url="tcp://10.0.0.1:29500",
            log=lambda s: None,
        )


def test_detectron2_converted_weights_load_with_nothing_missing(tmp_path):
    """detectron2's DetectionCheckpointer on the converter's .pkl: no ResNet weight of the R50-C4 model
    (backbone stem/res2-4 and roi_heads.res5) is missing, nothing is unexpected."""
    pytest.importorskip("detectron2")
    import re

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from simsiam_kit.detectron2_weights import convert_weights
    from simsiam_kit.evaluation.detection.detectron2_engine import build_cfg, register_res5_extra_norm

    torch.manual_seed(0)
    bb = build_backbone("resnet50", "imagenet")
    save_backbone(tmp_path / "bb.pt", bb, "resnet50", "imagenet")
    convert_weights(str(tmp_path / "bb.pt"), tmp_path / "w.pkl", log=lambda s: None)
    register_res5_extra_norm()
    cfg = build_cfg(_d2_job("d2_voc0712_R_50_C4_24k.yaml", 10, ["MODEL.RESNETS.NORM=BN"]))
    model = build_model(cfg)
    ckpt = DetectionCheckpointer(model)
    # what DetectionCheckpointer.load logs as incompatible keys (load = _load_file + _load_model + that log)
    inc = ckpt._load_model(ckpt._load_file(str(tmp_path / "w.pkl")))
    resnet = re.compile(r"(^|\.)(stem|res[2-5])\.")
    # the only res* weights left to initialise: MoCo's extra norm after res5, which a ResNet does not have
    assert {k for k in inc.missing_keys if resnet.search(k)} == {
        f"roi_heads.res5.norm.{n}" for n in ("weight", "bias", "running_mean", "running_var")
    }
    assert inc.unexpected_keys == [] and inc.incorrect_shapes == []
    sd = model.state_dict()
    torch.testing.assert_close(sd["roi_heads.res5.2.conv3.weight"], bb.layer4[2].conv3.weight)
    torch.testing.assert_close(sd["backbone.stem.conv1.norm.running_var"], bb.bn1.running_var)


def test_detectron2_extra_norm_head_builds():
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from simsiam_kit.evaluation.detection.detectron2_engine import register_res5_extra_norm

    register_res5_extra_norm()
    register_res5_extra_norm()  # idempotent
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / "d2_voc0712_R_50_C4_24k.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model(cfg)
    assert "roi_heads.res5.norm.weight" in model.state_dict()
