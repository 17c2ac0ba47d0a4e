"""Weights from other projects, made here from each project's documented saving code and key layouts
(tiny ResNet-18s): the loader recognises each by content, reads the encoder that project evaluates (or the
one ``FILE#NAME`` picks), and the backbone it builds holds the same tensors and computes the same features
as a plain torchvision model given those tensors. Variants it cannot build exactly are refused by name."""

from __future__ import annotations

import argparse
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torchvision

from simsiam_kit.errors import UserError
from simsiam_kit.weights import load_backbone

from helpers import cli


def _resnet(seed: int, cifar: bool = False, padding: int = 1, fc_out: int = 16) -> nn.Module:
    """A torchvision ResNet-18 with random (non-default) BN statistics, so features depend on every tensor."""
    torch.manual_seed(seed)
    m = torchvision.models.resnet18(num_classes=fc_out)
    if cifar:
        m.conv1 = nn.Conv2d(3, 64, 3, 1, padding, bias=False)
        m.maxpool = nn.Identity()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
                mod.num_batches_tracked.fill_(7)
    return m.eval()


def _backbone_sd(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("fc.")}


def _prefixed(sd: dict, prefix: str) -> dict:
    return OrderedDict((prefix + k, v) for k, v in sd.items())


def _mlp(prefix: str, dims=(16, 8, 16)) -> dict:
    torch.manual_seed(99)
    layers = [nn.Linear(dims[0], dims[1]), nn.BatchNorm1d(dims[1]), nn.ReLU(), nn.Linear(dims[1], dims[2])]
    return _prefixed(nn.Sequential(*layers).state_dict(), prefix)


@pytest.fixture(scope="module")
def nets():
    return {"a": _resnet(1), "b": _resnet(2), "cifar": _resnet(3, cifar=True, padding=2)}


def _official_simsiam(a: nn.Module) -> dict:
    """simsiam/builder.py: encoder = resnet(num_classes=dim) whose fc becomes the projector MLP (fc.0..fc.7),
    predictor beside it; main_simsiam.py saves {'epoch','arch','state_dict','optimizer'} of the DDP model."""
    enc = _backbone_sd(a)
    proj = _mlp("fc.", (512, 16, 16))
    sd = {**_prefixed(enc, "module.encoder."), **_prefixed(proj, "module.encoder."), **_mlp("module.predictor.")}
    return {"epoch": 100, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


def _features(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)


def _torchvision_with(sd: dict, cifar_padding=None) -> nn.Module:
    m = torchvision.models.resnet18()
    if cifar_padding is not None:
        m.conv1 = nn.Conv2d(3, 64, 3, 1, cifar_padding, bias=False)
        m.maxpool = nn.Identity()
    m.fc = nn.Identity()
    m.load_state_dict(sd)
    return m.eval()


def _assert_same_backbone(lb, want: dict, cifar_padding=None):
    got = lb.model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = _torchvision_with(want, cifar_padding)
    assert torch.equal(_features(lb.model.eval(), x), _features(ref, x))


def test_official_simsiam_checkpoint(tmp_path, nets):
    p = tmp_path / "checkpoint_0099.pth.tar"
    torch.save(_official_simsiam(nets["a"]), p)
    lb = load_backbone(str(p))
    _assert_same_backbone(lb, _backbone_sd(nets["a"]))
    assert (lb.arch, lb.stem, lb.record["epoch"], lb.record["format"]) == (
        "resnet18",
        "imagenet",
        100,
        "official SimSiam checkpoint",
    )
    assert lb.summary == (
        "official SimSiam checkpoint (epoch 100, resnet18): 120 encoder tensors, projector and predictor left out"
    )
    # the projector (encoder.fc.*: 2 linears + BN = 7 tensors) and predictor (7) are listed, not dropped silently
    assert lb.unused_report == "  not loaded (18 keys): module.encoder.fc.* (9), module.predictor.* (9)"


def test_moco_v2_and_v3_read_the_query_encoder_and_the_other_on_request(tmp_path, nets):
    a, b = _backbone_sd(nets["a"]), _backbone_sd(nets["b"])
    v2 = {
        **_prefixed(a, "module.encoder_q."),
        **_mlp("module.encoder_q.fc.", (512, 16, 8)),
        **_prefixed(b, "module.encoder_k."),
        **_mlp("module.encoder_k.fc.", (512, 16, 8)),
        "module.queue": torch.randn(8, 32),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    p2 = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": v2, "optimizer": {}}, p2)
    lb = load_backbone(str(p2))
    _assert_same_backbone(lb, a)
    assert lb.summary.startswith("MoCo v2 checkpoint (epoch 800, resnet18): 120 encoder_q tensors, projector")
    assert "momentum encoder" in lb.summary and "queue" in lb.summary and "#encoder_k" in lb.summary
    _assert_same_backbone(load_backbone(f"{p2}#encoder_k"), b)

    v3 = {
        **_prefixed(a, "module.base_encoder."),
        **_prefixed(b, "module.momentum_encoder."),
        **_mlp("module.predictor."),
    }
    p3 = tmp_path / "r-50-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "resnet18", "state_dict": v3, "optimizer": {}}, p3)
    lb = load_backbone(str(p3))
    _assert_same_backbone(lb, a)
    assert lb.summary.startswith("MoCo v3 checkpoint (epoch 300, resnet18): 120 base_encoder tensors")
    _assert_same_backbone(load_backbone(f"{p3}#momentum_encoder"), b)
    with pytest.raises(UserError, match=r"#student: the file holds no encoder named 'student' \(it holds: "):
        load_backbone(f"{p3}#student")


def test_dino_checkpoint_teacher_by_default_student_on_request(tmp_path, nets):
    """main_dino.py saves {'student','teacher','optimizer','epoch','args','dino_loss'}; both copies are DDP
    MultiCropWrapper(backbone, head) state dicts; its eval scripts read the teacher. ``args`` is an
    argparse.Namespace: read as an inert placeholder, never as code."""
    a, b = _backbone_sd(nets["a"]), _backbone_sd(nets["b"])
    ckpt = {
        "student": {**_prefixed(b, "module.backbone."), **_mlp("module.head.mlp.")},
        "teacher": {**_prefixed(a, "backbone."), **_mlp("head.mlp.")},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="resnet50", out_dim=65536),
        "dino_loss": {"center": torch.zeros(1, 16)},
    }
    p = tmp_path / "checkpoint.pth"
    torch.save(ckpt, p)
    lb = load_backbone(str(p))
    _assert_same_backbone(lb, a)
    assert lb.summary == (
        "DINO checkpoint (epoch 100): 120 teacher backbone tensors, head and student left out "
        "(also in the file: #student)"
    )
    _assert_same_backbone(load_backbone(f"{p}#student"), b)


def test_lightly_checkpoint_with_a_sequential_backbone(tmp_path, nets):
    """lightly's examples: backbone = nn.Sequential(*list(resnet.children())[:-1]), heads beside it, saved
    by Lightning (state_dict + epoch/global_step/pytorch-lightning_version)."""
    a = nets["a"]
    seq = nn.Sequential(*list(a.children())[:-1])
    sd = {
        **_prefixed(seq.state_dict(), "backbone."),
        **_mlp("projection_head.layers."),
        **_mlp("prediction_head.layers."),
    }
    p = tmp_path / "epoch=9-step=100.ckpt"
    ckpt = {"epoch": 9, "global_step": 100, "pytorch-lightning_version": "2.4.0", "state_dict": sd}
    torch.save({**ckpt, "hyper_parameters": {"lr": 0.06}, "optimizer_states": []}, p)
    lb = load_backbone(str(p))
    _assert_same_backbone(lb, _backbone_sd(a))
    assert lb.summary == "lightly checkpoint (epoch 9): 120 backbone tensors, projector and predictor left out"


def test_solo_learn_cifar_checkpoint_is_built_with_its_own_stem(tmp_path, nets):
    """solo-learn's CIFAR ResNet: conv1 3x3/1 with padding 2, no max-pool (solo/methods/base.py). The same
    tensors in a padding-1 network give other features: the loader must build solo-learn's stem."""
    c = nets["cifar"]
    bb = _backbone_sd(c)
    sd = {
        **_prefixed(bb, "backbone."),
        **_mlp("projector."),
        **_mlp("predictor."),
        "classifier.weight": torch.randn(10, 512),
        "classifier.bias": torch.zeros(10),
    }
    p = tmp_path / "simsiam-cifar10-ep=999.ckpt"
    torch.save({"epoch": 999, "global_step": 1, "pytorch-lightning_version": "2.1.0", "state_dict": sd}, p)
    lb = load_backbone(str(p))
    assert (lb.arch, lb.stem) == ("resnet18", "solo-cifar")
    _assert_same_backbone(lb, bb, cifar_padding=2)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(_features(lb.model, x), _features(_torchvision_with(bb, cifar_padding=1), x))
    assert lb.summary.startswith("solo-learn checkpoint (epoch 999): 120 backbone tensors, projector, predictor")


def test_mmpretrain_checkpoint(tmp_path, nets):
    a = _backbone_sd(nets["a"])
    sd = {**_prefixed(a, "backbone."), "head.fc.weight": torch.randn(10, 512), "head.fc.bias": torch.zeros(10)}
    p = tmp_path / "resnet18_8xb32_in1k.pth"
    torch.save({"meta": {"epoch": 100, "mmpretrain_version": "1.2.0"}, "state_dict": sd}, p)
    lb = load_backbone(str(p))
    _assert_same_backbone(lb, a)
    assert lb.summary == "mmpretrain checkpoint (epoch 100): 120 backbone tensors, head left out"


def test_torchvision_state_dict_half_precision_without_step_counters(tmp_path, nets):
    """A torchvision/timm classifier state dict (fc dropped), saved in float16 and bfloat16 and without
    ``num_batches_tracked`` (older saves): torch's strict load accepts that, and so does this loader."""
    a = nets["a"]
    for dtype in (torch.float16, torch.bfloat16):
        sd = {
            k: (v.to(dtype) if v.is_floating_point() else v)
            for k, v in a.state_dict().items()
            if not k.endswith("num_batches_tracked")
        }
        p = tmp_path / f"resnet18_{dtype}.pth"
        torch.save(sd, p)
        lb = load_backbone(str(p))
        want = {k: v.float() for k, v in sd.items() if not k.startswith("fc.")}
        got = lb.model.state_dict()
        for k, v in want.items():
            assert torch.equal(got[k], v), k
        assert all(int(got[k]) == 0 for k in got if k.endswith("num_batches_tracked"))
        assert lb.summary == "state dict: 100 backbone tensors, classifier (fc) left out"


def test_safetensors_file_with_timm_layout(tmp_path, nets):
    """timm's resnet18 (plain layout, like ``resnet50.a1_in1k``) saved as .safetensors, as the hub serves it."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    t = timm.create_model("resnet18", num_classes=10).eval()
    sd = {k: v.contiguous() for k, v in t.state_dict().items()}
    p = tmp_path / "model.safetensors"
    save_file(sd, str(p))
    lb = load_backbone(str(p))
    want = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    _assert_same_backbone(lb, want)
    t.reset_classifier(0)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(_features(lb.model, x), _features(t, x), atol=1e-5)
    assert lb.summary.startswith("safetensors file: 120 backbone tensors, classifier (fc) left out")


def test_variants_that_cannot_be_built_exactly_are_refused_by_name(tmp_path):
    timm = pytest.importorskip("timm")
    for name, words in (
        ("resnet18d", "a deep stem"),
        ("seresnet18", "squeeze-and-excitation"),
    ):
        p = tmp_path / f"{name}.pth"
        torch.save(timm.create_model(name, num_classes=0).state_dict(), p)
        with pytest.raises(UserError, match=words + r".*never built approximately"):
            load_backbone(str(p))
    resnext = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], groups=32)
    p = tmp_path / "resnext.pth"
    torch.save(resnext.state_dict(), p)
    with pytest.raises(UserError, match=r"grouped 3x3 convolutions \(ResNeXt"):
        load_backbone(str(p))


def test_pickled_model_refused_and_nothing_else_in_the_file(tmp_path, nets):
    p = tmp_path / "whole_model.pth"
    torch.save(nets["a"], p)
    with pytest.raises(UserError, match=r"pickled Python objects .*torch.save\(model.state_dict\(\), PATH\)"):
        load_backbone(str(p))
    q = tmp_path / "optimizer_only.pth"
    torch.save({"epoch": 3, "optimizer": {"state": {}}}, q)
    with pytest.raises(UserError, match=r"nor another checkpoint this toolkit reads \(top-level keys 'epoch', 'opt"):
        load_backbone(str(q))
    r = tmp_path / "heads_only.pth"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": _mlp("module.predictor."), "optimizer": {}}, r)
    with pytest.raises(UserError, match=r"without ResNet weights .*top-level key groups: module"):
        load_backbone(str(r))


def test_eval_knn_says_what_it_read(tmp_path, nets):
    """Every command taking --weights reads these files; the CLI prints the one summary line."""
    p = tmp_path / "checkpoint_0099.pth.tar"
    torch.save(_official_simsiam(nets["a"]), p)
    r = cli(
        "eval",
        "knn",
        "--weights",
        p,
        "--train-data",
        "demo:val[:20]",
        "--test-data",
        "demo:val[20:30]",
        "--k",
        "5",
        "--output",
        tmp_path / "knn",
    )
    assert r.exit_code == 0, r.output
    assert "official SimSiam checkpoint (epoch 100, resnet18): 120 encoder tensors, projector and predictor" in (
        r.output
    )


def test_selector_through_the_cli(tmp_path, nets):
    """FILE#NAME works wherever --weights does: the student of a DINO checkpoint, exported for torchvision."""
    a, b = _backbone_sd(nets["a"]), _backbone_sd(nets["b"])
    p = tmp_path / "checkpoint.pth"
    torch.save({"student": _prefixed(b, "module.backbone."), "teacher": _prefixed(a, "backbone."), "epoch": 5}, p)
    out = tmp_path / "student.pth"
    r = cli("export", "torchvision", "--weights", f"{p}#student", "--output", out)
    assert r.exit_code == 0, r.output
    assert "DINO checkpoint (epoch 5): 120 student backbone tensors, teacher left out" in r.output
    sd = torch.load(out, weights_only=True)
    assert set(sd) == set(b) and all(torch.equal(sd[k], b[k]) for k in b)
    r = cli("export", "torchvision", "--weights", f"{p}#nobody", "--output", tmp_path / "x.pth")
    assert r.exit_code == 2 and "no encoder named 'nobody' (it holds: 'teacher', 'student')" in r.output
