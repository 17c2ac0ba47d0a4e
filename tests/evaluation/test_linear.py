"""Linear probe: 100 % on a linearly separable set through the shared Trainer, head init, LR schedule,
LARS by hand, the backbone sanity check, and the CLI (full protocol and cached features) on real
CIFAR-10 images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from simsiam_kit.cli import app
from simsiam_kit.engine.optim import LARS
from simsiam_kit.evaluation.linear import (
    BackboneChanged,
    TensorLoader,
    check_backbone_unchanged,
    evaluate_head,
    freeze,
    make_head,
    snapshot_state,
    train_linear_head,
)
from simsiam_kit.models import build_backbone

runner = CliRunner()


def _separable(n: int, seed: int):
    """4 classes in 16-D, separated by a margin along 4 fixed directions, with noise off-axis."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 16, generator=g) * 0.3
    x[torch.arange(n), y] += 3.0  # class c is the only one with a large coordinate c
    return x, y


def test_linear_probe_reaches_100_percent_on_separable_toy_set(tmp_path):
    torch.manual_seed(0)
    xtr, ytr = _separable(256, 0)
    xte, yte = _separable(128, 1)
    head = make_head(16, 4)
    hist = train_linear_head(
        head,
        TensorLoader(xtr, ytr, 32, seed=0),
        lambda b: b["features"],
        epochs=8,
        base_lr=0.1,
        batch_size=32,
        eval_features=xte,
        eval_labels=yte,
        metrics_path=tmp_path / "metrics.jsonl",
    )
    assert evaluate_head(head, xtr, ytr)["top1"] == 100.0
    assert evaluate_head(head, xte, yte)["top1"] == 100.0
    assert hist[-1]["test_top1"] == 100.0 and hist[-1]["loss"] < hist[0]["loss"]
    # official schedule: lr = 0.1 x 32/256, cosine, set once per epoch
    init = 0.1 * 32 / 256
    assert [h["lr"] for h in hist] == pytest.approx([init * 0.5 * (1 + math.cos(math.pi * e / 8)) for e in range(8)])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["type"] == "epoch"] == list(range(1, 9))
    # the epoch lines carry the test scores (the head is scored before the metrics writer runs)
    assert [r["test_top1"] for r in lines if r["type"] == "epoch"] == [h["test_top1"] for h in hist]


def test_head_init_follows_main_lincls():
    torch.manual_seed(0)
    h = make_head(512, 100)
    assert torch.count_nonzero(h.bias) == 0
    assert h.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert abs(h.weight.mean().item()) < 1e-3


def test_lars_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.zeros(2))  # zero norm: plain SGD step
    opt = LARS(torch.optim.SGD([w, b], lr=0.5, momentum=0.0, weight_decay=0.1))
    w.grad = torch.tensor([0.0, 2.0])  # ||g|| = 2
    b.grad = torch.tensor([1.0, -1.0])
    opt.step()
    rate = 0.001 * 5 / (2 + 5 * 0.1 + 1e-8)
    assert w.detach().tolist() == pytest.approx([3.0 - 0.5 * rate * 0.3, 4.0 - 0.5 * rate * (2 + 0.4)], rel=1e-6)
    assert b.detach().tolist() == pytest.approx([-0.5, 0.5])  # no decay or scaling on a zero-norm tensor
    assert opt.param_groups[0]["weight_decay"] == 0.1  # restored after the step


def test_backbone_unchanged_check():
    torch.manual_seed(0)
    bb = freeze(build_backbone("resnet18", "cifar"))
    ref = snapshot_state(bb)
    with torch.no_grad():
        bb(torch.randn(4, 3, 16, 16))  # eval mode: BatchNorm statistics do not move
    check_backbone_unchanged(bb, ref)
    with torch.no_grad():
        bb.layer3[1].conv2.weight[0, 0, 0, 0] += 1e-4
    with pytest.raises(BackboneChanged, match=r"layer3\.1\.conv2\.weight"):
        check_backbone_unchanged(bb, ref)
    bb2 = build_backbone("resnet18", "cifar")
    ref2 = snapshot_state(bb2)
    bb2.train()
    with torch.no_grad():
        bb2(torch.randn(4, 3, 16, 16))  # train mode moves running_mean / running_var
    with pytest.raises(BackboneChanged, match="running_mean"):
        check_backbone_unchanged(bb2, ref2)


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("cached", [False, True])
def test_cli_linear_random_resnet18(tmp_path, cifar_val, cached):
    out = tmp_path / "lin"
    args = [
        "eval",
        "linear",
        "--weights",
        "random",
        "--arch",
        "resnet18",
        "--train-data",
        f"{cifar_val}[:256]",
        "--test-data",
        f"{cifar_val}[4900:]",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--output",
        str(out),
        "--no-progress",
        "--precision",
        "fp32",
    ]
    if cached:
        args += ["--cached-features", "--optimizer", "lars"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "backbone unchanged" in r.output
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["protocol"] == ("cached-features" if cached else "full")
    assert res["settings"]["init_lr"] == pytest.approx(0.1 * 64 / 256)
    assert res["settings"]["optimizer"] == ("lars" if cached else "sgd")
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["backbone_unchanged"] is True
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]
    assert res["epochs"][-1]["test_top1"] == pytest.approx(res["top1"])
    head = torch.load(out / "head.pt", weights_only=True)
    assert head["format"] == "simsiam-kit-linear-head" and head["state_dict"]["weight"].shape == (10, 512)
    assert head["classes"][0] == "airplane"
    assert (out / "plots" / "linear_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert len([ln for ln in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in ln]) >= 2


def test_cli_linear_bad_inputs(tmp_path, tiny_npz, cifar_val):
    with np.load(tiny_npz) as d:
        np.savez(
            tmp_path / "other.npz",
            images=d["images"],
            labels=d["labels"],
            class_names=np.array(["cat", "automobile", "bird"]),
        )
    cases = [
        (["--train-data", str(tiny_npz), "--test-data", str(tmp_path / "other.npz")], "different class lists"),
        (["--train-data", f"{cifar_val}[10:10]", "--test-data", str(tiny_npz)], "empty"),
        (["--train-data", str(tiny_npz), "--test-data", str(tiny_npz), "--optimizer", "adam"], "--optimizer"),
    ]
    for extra, want in cases:
        r = runner.invoke(
            app,
            [
                "eval",
                "linear",
                "--weights",
                "random",
                "--arch",
                "resnet18",
                "--epochs",
                "1",
                "--output",
                str(tmp_path / "o"),
                *extra,
            ],
        )
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and want in lines[0], r.output


def test_eval_download_options_reach_torchvision(tmp_path, monkeypatch):
    """--data-root/--download of the eval commands go to torchvision's real loader (network stubbed out)."""
    import torchvision.datasets as tvd

    calls = []
    monkeypatch.setattr(tvd.cifar, "download_and_extract_archive", lambda url, root, **k: calls.append((url, root)))
    args = [
        "eval",
        "linear",
        "--weights",
        "random",
        "--arch",
        "resnet18",
        "--train-data",
        "cifar10:train",
        "--test-data",
        "cifar10:test",
        "--data-root",
        str(tmp_path / "data"),
        "-o",
        str(tmp_path / "out"),
    ]
    res = runner.invoke(app, args)  # downloading is off: one line naming the option, nothing fetched
    assert res.exit_code == 2 and "--download" in res.output and calls == []
    res = runner.invoke(app, args + ["--download"])  # torchvision tries the real download into --data-root
    assert res.exit_code == 2 and calls and calls[0][0].endswith("cifar-10-python.tar.gz")
    assert str(tmp_path / "data") in str(calls[0][1])
