"""The detectron2 converter, checked against state_dict listings taken from a real detectron2 build
(``shared/fixtures/detectron2/*.json``) with detectron2's own suffix-matching rule."""

from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from simsiam_kit.cli import app
from simsiam_kit.detectron2_weights import check_against_model, convert_key, convert_state_dict, suffix_match
from simsiam_kit.engine.checkpoint import save_backbone, save_checkpoint
from simsiam_kit.errors import UserError
from simsiam_kit.models import build_backbone

from helpers import FIXTURES

FIXTURES = FIXTURES / "detectron2"
LISTINGS = sorted(FIXTURES.glob("*.json")) if FIXTURES.is_dir() else []
DEPTH_TO_ARCH = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101"}
# a backbone weight of a detectron2 model: the stem or a res2..res5 stage, wherever it is nested
# (backbone.*, backbone.bottom_up.* for FPN, roi_heads.res5.* for C4)
BACKBONE_KEY = re.compile(r"(^|\.)(stem|res[2-5])\.")


def test_key_map_by_hand():
    assert convert_key("conv1.weight") == "stem.conv1.weight"
    assert convert_key("bn1.running_var") == "stem.conv1.norm.running_var"
    assert convert_key("layer1.0.conv3.weight") == "res2.0.conv3.weight"
    assert convert_key("layer3.5.bn2.bias") == "res4.5.conv2.norm.bias"
    assert convert_key("layer4.0.downsample.0.weight") == "res5.0.shortcut.weight"
    assert convert_key("layer2.0.downsample.1.running_mean") == "res3.0.shortcut.norm.running_mean"
    # no counterpart: counters, heads, anything unknown
    for k in (
        "bn1.num_batches_tracked",
        "layer1.0.bn1.num_batches_tracked",
        "fc.weight",
        "projector.0.weight",
        "layer5.0.conv1.weight",
        "layer1.0.conv4.weight",
    ):
        assert convert_key(k) is None, k


def test_suffix_rule_matches_on_dot_boundary_and_prefers_longest():
    model = ["roi_heads.res5.0.conv1.weight", "backbone.res2.0.conv1.weight", "backbone.xres2.0.conv1.weight"]
    got = suffix_match(model, ["res2.0.conv1.weight", "conv1.weight", "res5.0.conv1.weight"])
    assert got == {
        "roi_heads.res5.0.conv1.weight": "res5.0.conv1.weight",
        "backbone.res2.0.conv1.weight": "res2.0.conv1.weight",
        "backbone.xres2.0.conv1.weight": "conv1.weight",
    }  # 'xres2' is no '.res2' boundary


@pytest.mark.skipif(
    not LISTINGS and os.environ.get("CI", "").lower() != "true", reason="shared/fixtures/detectron2 not found"
)
@pytest.mark.parametrize("listing", LISTINGS, ids=lambda p: p.stem)
def test_converted_keys_match_real_detectron2_models(listing):
    spec = json.loads(listing.read_text())
    model_shapes = {e["key"]: tuple(e["shape"]) for e in spec["state_dict"]}
    torch.manual_seed(0)
    bb = build_backbone(DEPTH_TO_ARCH[spec["resnet_depth"]], "imagenet")
    conv = convert_state_dict(bb.state_dict())
    ckpt_shapes = {k: tuple(v.shape) for k, v in conv.model.items()}

    res = check_against_model(ckpt_shapes, model_shapes)
    assert res["shape_mismatch"] == []
    assert res["ambiguous"] == {}
    assert res["unused"] == []
    # each converted key loads into exactly one model key ...
    assert sorted(res["loaded"].values()) == sorted(ckpt_shapes)
    # ... and every backbone key of the model is covered
    backbone_keys = {k for k in model_shapes if BACKBONE_KEY.search(k)}
    assert len(backbone_keys) > 50
    assert set(res["loaded"]) == backbone_keys
    if "C4" in listing.stem:
        assert any(k.startswith("roi_heads.res5.") for k in res["loaded"])
    if "FPN" in listing.stem:
        assert all(k.startswith("backbone.bottom_up.") for k in res["loaded"])
    # only the BN step counters stay behind (the backbone has no fc)
    assert conv.unconverted and all(k.endswith("num_batches_tracked") for k in conv.unconverted)


def test_values_survive_the_round_trip():
    torch.manual_seed(1)
    bb = build_backbone("resnet18", "imagenet")
    sd = bb.state_dict()
    conv = convert_state_dict(sd)
    for k, new in conv.mapping.items():
        np.testing.assert_array_equal(conv.model[new], sd[k].numpy())


def test_cifar_stem_is_refused():
    bb = build_backbone("resnet18", "cifar")
    with pytest.raises(UserError, match="3x3 stem"):
        convert_state_dict(bb.state_dict())


def test_cli_converts_checkpoint_and_reports_dropped_heads(tmp_path):
    torch.manual_seed(2)
    bb = build_backbone("resnet18", "imagenet")
    model_sd = {f"backbone.{k}": v for k, v in bb.state_dict().items()}
    model_sd["projector.0.weight"] = torch.zeros(4, 512)
    model_sd["predictor.0.weight"] = torch.zeros(4, 4)
    save_checkpoint(tmp_path / "last.pt", model=model_sd, config={"model": {"arch": "resnet18", "stem": "imagenet"}})
    out = tmp_path / "d2.pkl"
    r = CliRunner().invoke(app, ["export", "detectron2", "--weights", str(tmp_path / "last.pt"), "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "projector.0.weight" in r.output and "predictor.0.weight" in r.output
    # the 20 BatchNorm step counters of a ResNet-18 in one line (issue 15), not one line each
    assert "  20 x *.num_batches_tracked  (BatchNorm step counters" in r.output
    assert "layer1.0.bn1.num_batches_tracked" not in r.output
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600
    with open(out, "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "simsiam-kit" and obj["matching_heuristics"] is True
    assert len(obj["model"]) == 100  # resnet18: 20 convs + 20 BNs x 4 tensors
    np.testing.assert_array_equal(
        obj["model"]["res3.0.shortcut.weight"], bb.layer2[0].downsample[0].weight.detach().numpy()
    )


def test_cli_bad_inputs_exit_2(tmp_path):
    save_backbone(tmp_path / "cifar.pt", build_backbone("resnet18", "cifar"), "resnet18", "cifar")
    r = CliRunner().invoke(
        app, ["export", "detectron2", "--weights", str(tmp_path / "cifar.pt"), "--output", str(tmp_path / "x.pkl")]
    )
    assert r.exit_code == 2 and "CIFAR stem" in r.output
    save_checkpoint(tmp_path / "heads.pt", model={"projector.0.weight": torch.zeros(2, 2)}, config={})
    r = CliRunner().invoke(
        app, ["export", "detectron2", "--weights", str(tmp_path / "heads.pt"), "--output", str(tmp_path / "x.pkl")]
    )
    assert r.exit_code == 2 and "no backbone" in r.output
    assert not (tmp_path / "x.pkl").exists()
