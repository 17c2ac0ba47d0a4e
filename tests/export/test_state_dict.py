"""``export torchvision|timm``: the file loads with strict=True into torchvision's and timm's ResNets (as
the sidecar's recipe says) and gives the same features as the backbone it came from; the sidecar states
arch, stem, image size, mean/std, the resize rule and the source; a .safetensors export reads back."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from simsiam_kit.models import build_backbone
from simsiam_kit.weights import load_backbone

from helpers import cli


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(0)
    net = build_backbone("resnet18", "imagenet", zero_init_residual=False).eval()
    p = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(net.state_dict(), p)
    return net, p


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_torchvision_and_timm_load_strict(tmp_path, source, suffix):
    timm = pytest.importorskip("timm")
    net, p = source
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = net(x)
    for target in ("torchvision", "timm"):
        out = tmp_path / f"{target}{suffix}"
        r = cli("export", target, "--weights", p, "--output", out, "--image-size", "64")
        assert r.exit_code == 0, r.output
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(out))
        else:
            sd = torch.load(out, weights_only=True)
        if target == "torchvision":
            m = torchvision.models.resnet18()
            m.fc = torch.nn.Identity()
        else:
            m = timm.create_model("resnet18", num_classes=0)
        m.load_state_dict(sd, strict=True)
        with torch.no_grad():
            assert torch.allclose(m.eval()(x), want, atol=1e-5)
        side = json.loads((tmp_path / f"{target}.json").read_text())
        assert (side["arch"], side["stem"], side["image_size"], side["file"]) == ("resnet18", "imagenet", 64, out.name)
        assert side["mean"] == [0.485, 0.456, 0.406] and side["preprocessing"]["resize_shorter_side_to"] == 73
        assert side["preprocessing"]["interpolation"] == "bilinear" and side["preprocessing"]["antialias"] is True
        assert side["source"]["file"] == str(p) and len(side["source"]["sha256"]) == 64
        assert "strict=True" in side["load"] and ("num_classes=0" if target == "timm" else "Identity()") in side["load"]


def test_safetensors_export_reads_back_with_its_settings(tmp_path):
    """A solo-learn CIFAR stem survives the round trip: the file's metadata names it (shapes cannot)."""
    torch.manual_seed(1)
    net = build_backbone("resnet18", "solo-cifar").eval()
    p = tmp_path / "bb.pth"
    torch.save(
        {"format": "simsiam-kit-backbone", "arch": "resnet18", "stem": "solo-cifar", "state_dict": net.state_dict()}, p
    )
    out = tmp_path / "solo.safetensors"
    r = cli("export", "timm", "--weights", p, "--output", out)
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "solo.json").read_text())
    assert side["stem_detail"]["conv1"] == "3x3, stride 1, padding 2"
    assert "torch.nn.Conv2d(3, 64, 3, 1, 2, bias=False)" in side["load"]
    lb = load_backbone(str(out))
    assert (lb.arch, lb.stem, lb.image_size) == ("resnet18", "solo-cifar", 32)
    for k, v in net.state_dict().items():
        assert torch.equal(lb.model.state_dict()[k], v), k
    # the recipe in the sidecar runs as written
    ns = {}
    exec(side["load"].replace(side["file"], str(out)), ns)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ns["m"](x), net(x), atol=1e-5)


def test_bad_output_name_is_one_line(tmp_path, source):
    _, p = source
    r = cli("export", "torchvision", "--weights", p, "--output", tmp_path / "x.onnx")
    assert r.exit_code == 2 and "expected a .safetensors or .pth or .pt file name" in r.output
