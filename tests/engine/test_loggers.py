"""TensorBoard and W&B receive the same records as metrics.jsonl: pretraining scalars, the view-pair grid and
the final plots; evaluations write next to their results; log.tensorboard=false writes nothing."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simsiam_kit.cli import app
from simsiam_kit.engine.hooks import read_metrics

from helpers import tiny_overrides

runner = CliRunner()


def _pretrain(tmp_path, tiny_npz, *extra):
    out = tmp_path / "run"
    sets = tiny_overrides(str(tiny_npz), str(tiny_npz), epochs=2) + ["train.plots=true", *extra]
    res = runner.invoke(app, ["pretrain", "--output", str(out)] + [a for s in sets for a in ("--set", s)])
    assert res.exit_code == 0, res.output
    return out


def _events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_has_the_metrics_jsonl_scalars_and_images(tmp_path, tiny_npz):
    pytest.importorskip("tensorboard")  # in the dev extra; optional for users ('log' extra)
    out = _pretrain(tmp_path, tiny_npz)
    acc = _events(out / "tensorboard")
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "epoch" and "loss" in r]
    tb_loss = [(e.step, e.value) for e in acc.Scalars("epoch/loss")]
    assert tb_loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in epochs]
    knn = [r["knn_top1"] for r in read_metrics(out / "metrics.jsonl") if "knn_top1" in r]  # epoch 0 too
    assert [e.value for e in acc.Scalars("epoch/knn_top1")] == pytest.approx(knn)
    for key in ("epoch/std_x_sqrt_d", "epoch/images_per_s", "step/loss", "step/lr"):
        assert acc.Scalars(key)
    tags = acc.Tags()["images"]
    assert "views/image_view1_view2" in tags and any(t.startswith("plots/") for t in tags)


def test_tensorboard_off(tmp_path, tiny_npz):
    out = _pretrain(tmp_path, tiny_npz, "log.tensorboard=false")
    assert not (out / "tensorboard").exists()


def test_wandb_receives_the_same_records(tmp_path, tiny_npz, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, data, step=None):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    fake.Image = lambda img: ("image", np.asarray(img).shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)  # never the network: a stand-in module
    out = _pretrain(tmp_path, tiny_npz, "log.wandb=true", "log.tensorboard=false", "log.wandb_project=p")
    assert calls["init"][0]["project"] == "p" and calls["init"][0]["config"]["optim"]["epochs"] == 2
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "epoch" and "loss" in r]
    logged = [(s, d["epoch/loss"]) for s, d in calls["log"] if "epoch/loss" in d]
    assert logged == [(r["step"], pytest.approx(r["loss"])) for r in epochs]
    assert any("views/image_view1_view2" in d for _, d in calls["log"]) and calls["finish"] == 1


def test_wandb_missing_is_one_line(tmp_path, tiny_npz, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    out = tmp_path / "run"
    sets = tiny_overrides(str(tiny_npz), None) + ["log.wandb=true"]
    res = runner.invoke(app, ["pretrain", "--output", str(out)] + [a for s in sets for a in ("--set", s)])
    assert res.exit_code == 2 and "pip install wandb" in res.output and "Traceback" not in res.output


def test_linear_probe_writes_tensorboard_next_to_its_results(tmp_path, tiny_npz):
    pytest.importorskip("tensorboard")
    out = tmp_path / "lin"
    res = runner.invoke(
        app,
        [
            "eval",
            "linear",
            "--weights",
            "random",
            "--arch",
            "resnet18",
            "--stem",
            "cifar",
            "--train-data",
            str(tiny_npz),
            "--test-data",
            str(tiny_npz),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--cached-features",
            "--no-progress",
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    acc = _events(out / "tensorboard")
    top1 = json.loads((out / "results.json").read_text())["top1"]
    assert [e.value for e in acc.Scalars("eval/test_top1")] == pytest.approx([top1])
    assert len(acc.Scalars("epoch/loss")) == 2


def test_view_pair_grid_rows(cifar_val):
    import torch

    from simsiam_kit.config import DataConfig
    from simsiam_kit.data import load_dataset
    from simsiam_kit.data.transforms import BatchAugment
    from simsiam_kit.engine.loggers import view_pairs_grid

    ds = load_dataset(f"{cifar_val}[:4]")
    cfg = DataConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    g = view_pairs_grid(ds.images, BatchAugment(cfg), cfg.mean, cfg.std, n=4)
    assert g.shape == (96, 128, 3) and g.dtype == np.uint8
    # row 0: the images themselves (32 px already: the resize is the identity)
    assert np.abs(g[:32, :32].astype(int) - ds.images[0].astype(int)).max() <= 1
    assert not np.array_equal(g[32:64], g[64:96])  # two different views
    before = torch.random.get_rng_state()
    view_pairs_grid(ds.images, BatchAugment(cfg), cfg.mean, cfg.std, n=2)
    assert torch.equal(before, torch.random.get_rng_state())  # training streams untouched
