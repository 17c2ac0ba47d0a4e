"""Pretraining through the CLI (Typer's CliRunner): a tiny real run and every bad input."""

import json

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from simsiam_kit.cli import app

from helpers import tiny_overrides

runner = CliRunner()


def invoke(args):
    return runner.invoke(app, args, catch_exceptions=False)


def sets(overrides):
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


def test_help_lists_commands():
    r = invoke(["--help"])
    assert r.exit_code == 0
    for cmd in ("pretrain", "eval", "export"):
        assert cmd in r.output
    assert invoke(["pretrain", "--help"]).exit_code == 0


def test_tiny_pretrain_writes_run_directory(tmp_path, tiny_npz):
    out = tmp_path / "run"
    r = invoke(["pretrain", "--output", str(out)] + sets(tiny_overrides(str(tiny_npz), str(tiny_npz), epochs=2)))
    assert r.exit_code == 0, r.output
    assert "random-init backbone" in r.output
    for f in ("config.yaml", "checkpoints/last.pt", "backbone.pt", "metrics.jsonl", "results/pretrain.json"):
        assert (out / f).is_file(), f
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]  # epoch 0: the initial weights, scored before training
    assert set(epochs[0]) == {"type", "epoch", "step", "knn_top1"} and epochs[0]["step"] == 0
    for k in ("loss", "lr", "images_per_s", "std", "knn_top1"):
        assert k in epochs[-1]
    assert all(r["type"] == "step" and "loss" in r for r in recs if r["type"] != "epoch")
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and not any(k.startswith("module.") for k in ck["model"])
    bb = torch.load(out / "backbone.pt", weights_only=True)
    assert bb["arch"] == "resnet18" and set(bb["state_dict"]) == {
        k[len("backbone.") :] for k in ck["model"] if k.startswith("backbone.")
    }
    summary = json.loads((out / "results" / "pretrain.json").read_text())
    assert summary["knn_top1"] is not None and summary["knn_top1_random_init"] == epochs[0]["knn_top1"]
    assert summary["threads"]["threads"] >= 1 and summary["threads"]["chosen_by"]
    assert summary["knn"]["precision"] == "fp32" and summary["image_size"] == 16
    assert "optim:" in (out / "config.yaml").read_text()
    # atomically written files get the mode a plain open() gives (umask), not mkstemp's 0600
    from simsiam_kit.utils.io import current_umask

    for f in ("config.yaml", "checkpoints/last.pt", "backbone.pt", "metrics.jsonl", "results/pretrain.json"):
        assert (out / f).stat().st_mode & 0o777 == 0o666 & ~current_umask(), f


def test_plots_written(tmp_path, tiny_npz):
    out = tmp_path / "run"
    o = [x for x in tiny_overrides(str(tiny_npz), str(tiny_npz)) if not x.startswith("train.plots")]
    assert invoke(["pretrain", "--output", str(out)] + sets(o)).exit_code == 0
    for p in ("loss.png", "std.png", "knn.png", "lr.png"):
        assert (out / "plots" / p).stat().st_size > 1000


def _expect_error(args, *needles, code=2):
    r = runner.invoke(app, args)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.output, (n, r.output)
    return r


def test_bad_inputs(tmp_path, tiny_npz):
    base = ["pretrain", "--output", str(tmp_path / "r")]
    _expect_error(base + sets(tiny_overrides(str(tmp_path / "missing.npz"))), "dataset not found", "missing.npz")
    (tmp_path / "empty").mkdir()
    _expect_error(base + sets(tiny_overrides(str(tmp_path / "empty"))), "no images found")
    _expect_error(base + ["--set", "optim.epocs=2"], "unknown config key 'optim.epocs'")
    _expect_error(base + ["--set", "optim.epochs=many"], "optim.epochs", "integer")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  stem: vit\n")
    _expect_error(["pretrain", "--config", str(bad_yaml)], "model.stem", str(bad_yaml))
    _expect_error(base + sets(tiny_overrides(str(tiny_npz), batch=512)), "larger than the dataset")
    _expect_error(["pretrain", "--resume", "--output", str(tmp_path / "nothing")], "--resume", "no checkpoint")


def test_corrupt_image_named_or_skipped(tmp_path):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(9):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png"
            )
    (root / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00truncated")
    o = tiny_overrides(str(root), None, batch=8) + ["data.workers=0"]
    _expect_error(["pretrain", "--output", str(tmp_path / "r1")] + sets(o), "cannot read image", "3.png")
    r = invoke(["pretrain", "--output", str(tmp_path / "r2")] + sets(o + ["data.skip_bad_images=true"]))
    assert r.exit_code == 0, r.output
    recs = [json.loads(l) for l in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped", 0) for r in recs if r["type"] == "step") == 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_npz):
    """Epoch 1 runs at lr 0 (warm-up), epoch 2 blows the weights up to ~1e28 (finite), epoch 3's loss is NaN:
    the run stops with exit 2 and the checkpoint of epoch 2 stays. (A resumed run may not change its lr:
    tests/test_bad_inputs.py.)"""
    out = tmp_path / "run"
    o = tiny_overrides(str(tiny_npz), None, epochs=3) + [
        "optim.warmup_epochs=1",
        "train.max_steps_per_epoch=1",
        "optim.base_lr=1e30",
    ]
    r = _expect_error(["pretrain", "--output", str(out)] + sets(o), "loss became nan", "last good checkpoint")
    after = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert after["epoch"] == 2
    assert torch.load(out / "backbone.pt", weights_only=True)["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in after["model"].values() if v.is_floating_point())
    assert r.exit_code == 2


def test_knn_monitor_runs_after_the_checkpoint(tmp_path, tiny_npz, monkeypatch):
    """The epoch's checkpoint is on disk before the kNN monitor runs: a monitor that fails loses nothing,
    and resuming finishes that epoch (monitor + metrics line) before training on."""
    import simsiam_kit.pretrain as pretrain

    out = tmp_path / "run"
    o = tiny_overrides(str(tiny_npz), str(tiny_npz), epochs=2)
    real = pretrain.make_knn_eval

    def failing(p, batch_size=None):
        calls = []

        def knn_eval(backbone=None):  # scores the initial weights (epoch 0), then fails after epoch 1
            calls.append(1)
            if len(calls) == 1:
                return 12.5
            raise pretrain.UserError("monitor failed")

        return knn_eval if real(p) is not None else None

    monkeypatch.setattr(pretrain, "make_knn_eval", failing)
    r = runner.invoke(app, ["pretrain", "--output", str(out)] + sets(o))
    assert r.exit_code == 2 and "monitor failed" in r.output
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert torch.load(out / "backbone.pt", weights_only=True)["epoch"] == 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["type"] == "epoch"] == [0]  # epoch 1's line comes after the monitor
    monkeypatch.setattr(pretrain, "make_knn_eval", real)
    r = invoke(["pretrain", "--output", str(out), "--resume"] + sets(o))
    assert r.exit_code == 0, r.output
    epochs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and all(e.get("knn_top1") is not None for e in epochs)
    assert epochs[0]["knn_top1"] == 12.5  # resuming does not score epoch 0 again
    assert epochs[1]["step"] == 3 and epochs[1]["lr"] is not None and "loss" in epochs[1]
    summary = json.loads((out / "results" / "pretrain.json").read_text())
    assert summary["knn_top1_random_init"] == 12.5


def test_run_directory_resolves_to_the_newer_of_backbone_and_checkpoint(tmp_path):
    from simsiam_kit.engine.checkpoint import BACKBONE_FORMAT, CHECKPOINT_FORMAT
    from simsiam_kit.weights import resolve_weights_path

    (tmp_path / "checkpoints").mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": 2}, tmp_path / "checkpoints" / "last.pt")
    torch.save({"format": BACKBONE_FORMAT, "epoch": 1}, tmp_path / "backbone.pt")
    assert resolve_weights_path(str(tmp_path)) == tmp_path / "checkpoints" / "last.pt"  # stale backbone.pt
    torch.save({"format": BACKBONE_FORMAT, "epoch": 2}, tmp_path / "backbone.pt")
    assert resolve_weights_path(str(tmp_path)) == tmp_path / "backbone.pt"


def test_overwrite_replaces_only_the_run_files(tmp_path, tiny_npz):
    out = tmp_path / "run"
    o = tiny_overrides(str(tiny_npz), None)
    assert invoke(["pretrain", "--output", str(out)] + sets(o)).exit_code == 0
    (out / "notes.txt").write_text("mine\n")
    (out / "checkpoints" / ".last.pt.abcd1234.tmp").write_bytes(b"x" * 1000)  # left by a killed write
    r = invoke(["pretrain", "--output", str(out), "--overwrite"] + sets(o))
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "mine\n"
    assert not list(out.rglob("*.tmp"))
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"type": "epoch"' in line]) == 1
