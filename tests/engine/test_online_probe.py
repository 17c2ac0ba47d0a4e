"""The online linear probe: trained on detached features (the backbone's gradients and weights are exactly
those of a run without it), its val top-1 reaches metrics.jsonl each epoch, it resumes exactly, and auto
turns it on for labelled in-memory data only."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from simsiam_kit.cli import app
from simsiam_kit.config import load_pretrain_config
from simsiam_kit.engine.hooks import read_metrics
from simsiam_kit.errors import UserError
from simsiam_kit.pretrain import build_pretraining

from helpers import tiny_overrides

runner = CliRunner()


def _run(tmp_path, tiny_npz, name, *extra, epochs=2):
    out = tmp_path / name
    sets = tiny_overrides(str(tiny_npz), str(tiny_npz), epochs=epochs) + ["train.deterministic=true", *extra]
    res = runner.invoke(app, ["pretrain", "--output", str(out)] + [a for s in sets for a in ("--set", s)])
    assert res.exit_code == 0, res.output
    return out


def test_probe_does_not_touch_the_backbone(tmp_path, tiny_npz):
    with_probe = _run(tmp_path, tiny_npz, "a", "train.online_probe=true")
    without = _run(tmp_path, tiny_npz, "b", "train.online_probe=false")
    a = torch.load(with_probe / "backbone.pt", weights_only=True)["state_dict"]
    b = torch.load(without / "backbone.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical SimSiam training
    epochs = [r for r in read_metrics(with_probe / "metrics.jsonl") if r["type"] == "epoch" and r["epoch"] >= 1]
    assert len(epochs) == 2 and all(0 <= r["online_probe_top1"] <= 100 for r in epochs)
    assert all("probe_loss" in r for r in epochs)
    assert not any("online_probe_top1" in r for r in read_metrics(without / "metrics.jsonl"))


def test_probe_learns_on_separable_features():
    from simsiam_kit.engine.online_probe import OnlineProbe

    torch.manual_seed(0)
    probe = OnlineProbe(8, 4, torch.device("cpu"), batch_size=256)
    y = torch.arange(256) % 4
    x = torch.randn(256, 8) * 0.1
    x[torch.arange(256), y] += 2.0
    for _ in range(200):
        probe.step(x, y)
    assert probe.top1(x, y) == 100.0


def test_probe_state_round_trips_and_resume_continues_it(tmp_path, tiny_npz):
    from simsiam_kit.engine.online_probe import OnlineProbe

    torch.manual_seed(0)
    a = OnlineProbe(8, 3, torch.device("cpu"), batch_size=64)
    x, y = torch.randn(64, 8), torch.arange(64) % 3
    for _ in range(3):
        a.step(x, y)
    b = OnlineProbe(8, 3, torch.device("cpu"), batch_size=64)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as through a checkpoint file (no shared buffers)
    a.step(x, y)
    b.step(x, y)  # same weights and momentum: the same next update
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    # a resumed run restores the probe from its checkpoint and keeps training it
    part = _run(tmp_path, tiny_npz, "part", "train.online_probe=true", epochs=1)
    first = torch.load(part / "checkpoints" / "last.pt", weights_only=True)["probe"]["head"]["weight"].clone()
    sets = tiny_overrides(str(tiny_npz), str(tiny_npz), epochs=2) + [
        "train.deterministic=true",
        "train.online_probe=true",
    ]
    res = runner.invoke(app, ["pretrain", "--resume", "--output", str(part)] + [a for s in sets for a in ("--set", s)])
    assert res.exit_code == 0, res.output
    second = torch.load(part / "checkpoints" / "last.pt", weights_only=True)["probe"]["head"]["weight"]
    assert not torch.equal(first, second)
    epochs = [r for r in read_metrics(part / "metrics.jsonl") if r["type"] == "epoch" and r["epoch"] >= 1]
    assert [r["epoch"] for r in epochs] == [1, 2] and all("online_probe_top1" in r for r in epochs)


def test_auto_and_refusal(tiny_npz):
    cfg = load_pretrain_config("demo", tiny_overrides(str(tiny_npz), str(tiny_npz)))
    assert build_pretraining(cfg, torch.device("cpu")).step.probe is not None  # labelled, in memory: on
    cfg = load_pretrain_config("demo", tiny_overrides(str(tiny_npz), None) + ["train.online_probe=true"])
    with pytest.raises(UserError, match="online_probe=true needs"):
        build_pretraining(cfg, torch.device("cpu"))
