"""A newcomer's first hour (issue 15): a baseline that matches its run by construction, one feature rule
(the pretraining summary and ``eval knn`` agree), the kNN epoch-0 point, results that name their weights
and are never overwritten silently, errors in the words of the command in use, help that prints as
written, path checks before torch, and the CPU thread rule. Tiny real inputs, answers worked by hand."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from simsiam_kit.cli import app
from simsiam_kit.errors import UserError

from helpers import DATA, REPO, need, tiny_overrides

runner = CliRunner()


def sets(overrides) -> list[str]:
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


def lines_of(text: str) -> list[str]:
    return [ln for ln in text.strip().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """A tiny labelled npz (48 CIFAR images, 16 px, 3 classes) and a 2-epoch run on it trained in bf16 with
    channels_last (its features must still match the fp32 contiguous rule of the eval commands)."""
    d = tmp_path_factory.mktemp("newcomer")
    with np.load(need(DATA / "cifar10" / "val.npz")) as z:
        keep = np.flatnonzero(z["labels"] < 3)[:48]
        images = np.ascontiguousarray(z["images"][keep][:, 8:24, 8:24])
        labels = z["labels"][keep].astype(np.int64)
    np.savez(d / "tiny.npz", images=images, labels=labels, class_names=np.array(["airplane", "automobile", "bird"]))
    npz = str(d / "tiny.npz")
    o = [x for x in tiny_overrides(npz, npz, epochs=2) if not x.startswith("train.precision")]
    o += ["train.precision=bf16", "train.channels_last=true"]
    r = runner.invoke(app, ["pretrain", "--output", str(d / "run")] + sets(o))
    assert r.exit_code == 0, r.output
    return d


def _knn(*args) -> list[str]:
    return ["eval", "knn", *map(str, args), "--k", "5", "--temperature", "0.1", "--no-plots"]


# ------------------------------------------------------------------------------ baseline and one feature rule
def test_summary_eval_knn_and_random_like_run_agree(ctx):
    """Item 5: the same backbone gets the same kNN top-1 from the pretraining summary and from eval knn.
    Item 2: --weights random --like RUN is the run's own epoch-0 backbone, scored at the run's image settings."""
    run, npz = ctx / "run", ctx / "tiny.npz"
    summary = json.loads((run / "results" / "pretrain.json").read_text())
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]
    epoch0 = next(e for e in epochs if e["type"] == "epoch" and e["epoch"] == 0)
    assert summary["knn_top1_random_init"] == epoch0["knn_top1"]

    r = runner.invoke(app, _knn("--weights", run, "--train-data", npz, "--test-data", npz))
    assert r.exit_code == 0, r.output
    trained = json.loads((run / "eval" / "knn" / "results.json").read_text())
    assert trained["top1"] == pytest.approx(summary["knn_top1"], abs=1e-9)  # one image would move it 2.08 points
    assert trained["settings"]["precision"] == "fp32" and trained["settings"]["image_size"] == 16

    r = runner.invoke(app, _knn("--weights", "random", "--like", run, "--train-data", npz, "--test-data", npz))
    assert r.exit_code == 0, r.output
    base = json.loads((run / "eval" / "knn-random-init" / "results.json").read_text())  # the default output
    assert base["top1"] == pytest.approx(summary["knn_top1_random_init"], abs=1e-9)
    assert base["weights"] == {
        "spec": "random",
        "kind": "random",
        "like": str(run),
        "seed": 0,
        "init": f"the initial weights of {run} (seed 0)",
    }
    assert (base["settings"]["arch"], base["settings"]["stem"], base["settings"]["image_size"]) == (
        "resnet18",
        "cifar",
        16,
    )
    assert base["settings"]["image_settings_from"]["image_size"] == "config"
    # both rows in the printed table, trained first
    assert "against the run's own random init" in r.output
    rows = [ln for ln in r.output.splitlines() if ln.startswith(("SimSiam", "random init"))]
    assert rows[0].startswith("SimSiam run (epoch 2)") and rows[1].startswith("random init (run, seed 0)")


def test_random_like_run_is_the_runs_initial_backbone_bit_for_bit(ctx):
    from simsiam_kit.pretrain import build_pretraining, load_run_config, seed_everything
    from simsiam_kit.weights import load_backbone

    cfg = load_run_config(ctx / "run", None)
    seed_everything(cfg.train.seed)
    initial = build_pretraining(cfg, torch.device("cpu")).model.backbone.state_dict()
    before = torch.get_rng_state()
    like = load_backbone("random", like=str(ctx / "run")).model.state_dict()
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    assert initial.keys() == like.keys() and all(torch.equal(initial[k].float(), like[k].float()) for k in initial)
    with pytest.raises(UserError, match="trains a resnet18 with the cifar stem"):
        load_backbone("random", arch="resnet34", like=str(ctx / "run"))


# ------------------------------------------------------------------------------ results name their weights
def test_results_name_the_weights_and_are_kept(ctx, tmp_path):
    run, npz = ctx / "run", ctx / "tiny.npz"
    out = tmp_path / "knn"
    args = _knn("--weights", run / "backbone.pt", "--train-data", npz, "--test-data", npz, "--output", out)
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    w = res["weights"]
    assert (w["file"], w["kind"], w["epoch"], w["run_dir"], w["run_in_progress"]) == (
        str(run / "backbone.pt"),
        "backbone",
        2,
        str(run),
        None,
    )
    assert w["sha256"] == hashlib.sha256((run / "backbone.pt").read_bytes()).hexdigest()
    # a rerun keeps the earlier results and says how to replace them
    (out / "plots").mkdir()
    (out / "plots" / "stale.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    before = (out / "results.json").read_bytes()
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and len(lines_of(r.output)) == 1, r.output
    assert "already holds the results of an earlier evaluation" in r.output and "--overwrite" in r.output
    assert (out / "results.json").read_bytes() == before
    r = runner.invoke(app, args + ["--overwrite"])
    assert r.exit_code == 0, r.output
    assert not (out / "plots" / "stale.png").exists() and (out / "notes.txt").read_text() == "mine"


def test_run_in_progress_gets_a_note(ctx, tmp_path):
    run, npz = ctx / "run", ctx / "tiny.npz"
    with open(run / ".lock", "a") as lock:  # what a training process holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = runner.invoke(
            app, _knn("--weights", run, "--train-data", npz, "--test-data", npz, "--output", tmp_path / "o")
        )
    assert r.exit_code == 0, r.output
    note = [ln for ln in r.output.splitlines() if "still training" in ln]
    assert len(note) == 1 and note[0].startswith(f"note: {run} is still training (pid {os.getpid()})")
    assert "backbone.pt of epoch 2" in note[0]
    assert json.loads((tmp_path / "o" / "results.json").read_text())["weights"]["run_in_progress"] == os.getpid()


def test_run_lock_holder(tmp_path):
    from simsiam_kit.weights import run_lock_holder

    assert run_lock_holder(tmp_path) is None  # no lock file
    (tmp_path / ".lock").write_text("123\n")
    assert run_lock_holder(tmp_path) is None  # a lock file nobody holds (a run that ended)
    with open(tmp_path / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_lock_holder(tmp_path) == os.getpid()
    assert run_lock_holder(tmp_path) is None


# ------------------------------------------------------------------------------ the weights resolver
def test_weights_spec_resolver(ctx, tmp_path):
    from simsiam_kit.weights import resolve_weights

    run = ctx / "run"
    ws = resolve_weights("random")
    assert ws.random and ws.run_dir is None and ws.path is None
    assert resolve_weights("random", like=str(run)).run_dir == run
    assert resolve_weights(str(run)).run_dir == run and resolve_weights(str(run)).file() == run / "backbone.pt"
    assert resolve_weights(str(run / "checkpoints" / "last.pt")).run_dir == run  # a file inside a run
    with pytest.raises(UserError, match="not a simsiam-kit run directory"):
        resolve_weights("random", like=str(tmp_path))
    with pytest.raises(UserError, match="random weights only"):
        resolve_weights(str(run), like=str(run))
    with pytest.raises(UserError, match="weights not found"):
        resolve_weights(str(tmp_path / "nope.pt"))


def test_a_weights_file_is_read_once(ctx, monkeypatch):
    from simsiam_kit.weights import load_backbone

    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    with pytest.raises(UserError, match=r"missing: layer1\.2\..*holds a resnet18 with the cifar stem"):
        load_backbone(str(ctx / "run" / "backbone.pt"), arch="resnet34")
    assert len(calls) == 1


@pytest.mark.parametrize(
    "name, content, what",
    [
        ("model.onnx", b"\x08\x07\x12\x07pytorch" + b"\x00" * 40, "an ONNX model"),
        (
            "model_final.pkl",
            pickle.dumps({"model": {"conv1.weight": np.zeros(3)}, "__author__": "x"}),
            "a Python pickle",
        ),
        ("config.yaml", b"data:\n  train: demo\n", "a YAML text file"),
        ("data.npz", None, "a NumPy .npz archive"),
    ],
)
def test_foreign_weights_files_are_named(tmp_path, name, content, what):
    p = tmp_path / name
    if content is None:
        np.savez(p, images=np.zeros((2, 4, 4, 3), np.uint8))
    else:
        p.write_bytes(content)
    r = runner.invoke(
        app,
        [
            "eval",
            "knn",
            "--weights",
            str(p),
            "--train-data",
            "demo:val[:20]",
            "--test-data",
            "demo:val[:20]",
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 2 and len(lines_of(r.output)) == 1, r.output
    assert f"cannot load {p}: it is {what}" in r.output and "run directory" in r.output
    assert not (tmp_path / "o").exists()


def test_pickled_objects_in_a_torch_file(tmp_path):
    p = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), p)  # a whole module, not a state dict
    r = runner.invoke(
        app,
        [
            "eval",
            "knn",
            "--weights",
            str(p),
            "--train-data",
            "demo:val[:20]",
            "--test-data",
            "demo:val[:20]",
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 2 and len(lines_of(r.output)) == 1, r.output
    assert "pickled Python objects" in r.output and "state_dict()" in r.output


# ------------------------------------------------------------------------------ image settings, one resolver
def test_image_settings_precedence():
    from simsiam_kit.image_settings import resolve_image_settings

    s = resolve_image_settings(
        option={"image_size": None, "mean": (0.5, 0.5, 0.5)},
        weights={"image_size": 16, "mean": None, "std": None},
        config={"image_size": 32, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)},
        stem="cifar",
    )
    assert (s.image_size, s.mean, s.std) == (16, (0.5, 0.5, 0.5), (0.4, 0.5, 0.6))
    assert dict(s.sources) == {"image_size": "weights", "mean": "option", "std": "config"}
    assert resolve_image_settings(stem="cifar").image_size == 32
    assert resolve_image_settings(stem="imagenet").image_size == 224
    assert resolve_image_settings(stem="imagenet", data_size=28).image_size == 28  # in-memory: its own size
    d = resolve_image_settings()
    assert (d.mean, d.std, d.source) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "default")
    with pytest.raises(UserError, match="image mean from the weights' metadata has 2 values"):
        resolve_image_settings(weights={"mean": (0.1, 0.2)})
    with pytest.raises(UserError, match="must be positive"):
        resolve_image_settings(config={"std": (0.1, 0.0, 0.1)})
    with pytest.raises(UserError, match="image size 4 from the command option"):
        resolve_image_settings(option={"image_size": 4})


def test_export_uses_the_same_resolver(ctx):
    from simsiam_kit.export.onnx import load_encoder

    enc = load_encoder(str(ctx / "run"))
    cfg_mean = tuple(json.loads((ctx / "run" / "results" / "pretrain.json").read_text())["mean"])
    assert (enc.image_size, enc.mean) == (16, cfg_mean)
    assert load_encoder(str(ctx / "run"), image_size=24).image_size == 24
    assert load_encoder("random", arch="resnet18", stem="cifar").image_size == 32


# ------------------------------------------------------------------------------ the option of the command in use
@pytest.fixture
def corrupt_folder(tmp_path) -> Path:
    folder = tmp_path / "folder"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                folder / c / f"{i}.png"
            )
    (folder / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00truncated")
    return folder


def test_unreadable_images_name_each_commands_option(corrupt_folder, tmp_path):
    f = str(corrupt_folder)
    args = [
        "eval",
        "knn",
        "--weights",
        "random",
        "--arch",
        "resnet18",
        "--stem",
        "cifar",
        "--train-data",
        f,
        "--test-data",
        f,
        "--k",
        "3",
        "--no-plots",
    ]
    r = runner.invoke(app, args + ["--output", str(tmp_path / "a")])  # read by 2 DataLoader workers
    assert r.exit_code == 2 and len(lines_of(r.output)) == 1, r.output
    assert "cannot read image" in r.output and "3.png" in r.output and "(--skip-bad-images skips" in r.output
    assert "data.skip_bad_images" not in r.output
    r = runner.invoke(app, args + ["--output", str(tmp_path / "b"), "--skip-bad-images"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "results.json").read_text())["settings"]["bank_size"] == 15
    r = runner.invoke(
        app,
        ["pretrain", "--output", str(tmp_path / "run")]
        + sets(tiny_overrides(f, None) + ["optim.batch_size=8", "data.workers=0"]),
    )
    assert r.exit_code == 2 and "--set data.skip_bad_images=true" in r.output and "--skip-bad-images" not in r.output


# ------------------------------------------------------------------------------ help, checks before torch
def test_help_prints_as_written():
    r = runner.invoke(app, ["embed", "--help"], terminal_width=200)
    assert "(slice with [a:b])" in r.output
    r = runner.invoke(app, ["pretrain", "--help"], terminal_width=200)
    assert "<bool>" not in r.output and "--resume" in r.output
    r = runner.invoke(app, ["eval", "linear", "--help"], terminal_width=200)
    seed = next(ln for ln in r.output.splitlines() if ln.strip().startswith("--seed"))
    assert "Seed of the head" in seed
    assert "--like RUN" in r.output and "--skip-bad-images" in r.output and "--overwrite" in r.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["eval", "knn", "--weights", "/nonexistent/run", "--train-data", "demo:train", "--test-data", "demo:val"],
            "weights not found: /nonexistent/run",
        ),
        (
            [
                "eval",
                "linear",
                "--weights",
                "random",
                "--arch",
                "resnet18",
                "--train-data",
                "/nonexistent.npz",
                "--test-data",
                "demo:val",
            ],
            "--train-data /nonexistent.npz: dataset not found",
        ),
        (["pretrain", "--set", "data.train=/nonexistent.npz"], "data.train /nonexistent.npz: dataset not found"),
        (["export", "onnx", "--weights", "/nonexistent.pt", "--output", "/tmp/x.onnx"], "weights not found"),
        (
            [
                "eval",
                "knn",
                "--weights",
                "random",
                "--arch",
                "resnet18",
                "--train-data",
                "demo:train",
                "--test-data",
                "demo:val",
                "--mean",
                "0.1,0.2",
            ],
            "--mean: expected 3 comma-separated numbers",
        ),
        (
            ["eval", "linear", "--weights", "random", "--train-data", "demo:train", "--test-data", "demo:val"],
            "--weights random needs --like RUN",
        ),
        (
            [
                "eval",
                "knn",
                "--weights",
                "/tmp",
                "--like",
                "/tmp",
                "--train-data",
                "demo:train",
                "--test-data",
                "demo:val",
            ],
            "--like applies to --weights random only",
        ),
    ],
)
def test_wrong_paths_are_reported_before_torch_is_imported(args, needle):
    code = (
        "import sys; from typer.testing import CliRunner; from simsiam_kit.cli import app; "
        f"r = CliRunner().invoke(app, {args!r}); "
        "print(r.exit_code, 'torch' in sys.modules); print(r.output)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    first, *rest = out.stdout.splitlines()
    assert first == "2 False", out.stdout + out.stderr
    assert needle in "\n".join(rest)


def test_export_detectron2_summarises_bn_counters(tmp_path):
    from simsiam_kit.engine.checkpoint import save_backbone
    from simsiam_kit.models import build_backbone

    save_backbone(tmp_path / "backbone.pt", build_backbone("resnet18", "imagenet"), "resnet18", "imagenet")
    r = runner.invoke(
        app, ["export", "detectron2", "--weights", str(tmp_path / "backbone.pt"), "--output", str(tmp_path / "d2.pkl")]
    )
    assert r.exit_code == 0, r.output
    counters = [ln for ln in r.output.splitlines() if "num_batches_tracked" in ln]
    # ResNet-18: bn1, 2 per basic block x 8 blocks, 3 downsample BNs = 20 counters, one line
    assert counters == ["  20 x *.num_batches_tracked  (BatchNorm step counters, unused by detectron2)"]


def test_knn_benchmark_names_the_missing_extra_first(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("knn_eval_bench", REPO / "benchmarks" / "knn_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lightly" else real(name, *a))
    called = []
    monkeypatch.setattr(mod, "cifar_features", lambda: called.append(1))
    with pytest.raises(SystemExit) as e:
        mod.main(["--features", "synthetic", "--skip-linear"])
    assert e.value.code == 2 and called == []
    err = capsys.readouterr().err
    assert lines_of(err) == ["error: 'lightly' is not installed; install it with: pip install -e '.[bench]'"]


# ------------------------------------------------------------------------------ threads, start notes, kNN plot
@pytest.mark.parametrize(
    "env, cores, load, want",
    [
        ({}, 2, 0.3, (2, "auto", False)),  # idle: every usable core
        ({}, 2, 0.9, (1, "auto", False)),  # 1.1 cores idle -> 1 thread
        ({}, 2, 1.6, (1, "auto", True)),  # 0.4 idle -> at least 1, and the machine is busy
        ({}, 8, 2.0, (6, "auto", False)),
        ({"OMP_NUM_THREADS": "3"}, 2, 5.0, (3, "OMP_NUM_THREADS", True)),  # the user's choice wins
    ],
)
def test_choose_threads(env, cores, load, want):
    from simsiam_kit.utils.device import choose_threads

    c = choose_threads(env, cores=cores, load=load)
    assert (c["threads"], c["chosen_by"], c["busy"]) == want


def test_apply_thread_choice_sets_the_environment(monkeypatch):
    from simsiam_kit.utils import device
    from simsiam_kit.utils.device import apply_thread_choice

    monkeypatch.setattr(device, "_THREADS", {})  # the choice stays in this test (no re-check in later runs)

    env = {}
    c = apply_thread_choice(env)
    assert env["OMP_NUM_THREADS"] == str(c["threads"]) and c["chosen_by"] == "auto"
    with pytest.raises(UserError, match="OMP_NUM_THREADS='two'"):
        apply_thread_choice({"OMP_NUM_THREADS": "two"})


def test_start_notes_warn_on_busy_cores_and_demo_settings(monkeypatch):
    import simsiam_kit.engine.report as report
    from simsiam_kit.config import load_pretrain_config

    busy = {"threads": 2, "chosen_by": "OMP_NUM_THREADS", "usable_cores": 2, "load_average": 4.5, "busy": True}
    monkeypatch.setattr(report, "thread_settings", lambda: busy)
    cpu = torch.device("cpu")
    notes = report.start_notes(load_pretrain_config("demo", ["data.train=/data/mine.npz"]), cpu)
    assert notes[0].startswith(
        "images 16 px, mean [0.1307, 0.1307, 0.1307], std [0.3081, 0.3081, 0.3081]; 2 CPU "
        "threads (OMP_NUM_THREADS, load average 4.5 on 2 usable cores)"
    )
    assert any(n.startswith("warning: load average 4.5") and "1 is usually much faster" in n for n in notes)
    assert any(n.startswith("warning: data.train is /data/mine.npz, but the demo's MNIST settings") for n in notes)
    idle = dict(busy, threads=2, chosen_by="auto", load_average=0.1, busy=False)
    monkeypatch.setattr(report, "thread_settings", lambda: idle)
    assert len(report.start_notes(load_pretrain_config("demo", None), cpu)) == 1
    assert len(report.start_notes(load_pretrain_config("cifar10_resnet18", ["data.train=/x.npz"]), cpu)) == 1
    # chosen from idle CPU time (issue 25), the notes say so and not the lagging load average (1.21 just after
    # another job ended, on cores idle now)
    sampled = dict(idle, busy_cores=0.05, load_average=1.21, measured_by="/proc/stat over 0.5 s")
    monkeypatch.setattr(report, "thread_settings", lambda: sampled)
    notes = report.start_notes(load_pretrain_config("demo", None), cpu)
    assert notes == [
        "images 16 px, mean [0.1307, 0.1307, 0.1307], std [0.3081, 0.3081, 0.3081]; 2 CPU threads (auto, other "
        "processes kept 0.05 of 2 usable cores busy (/proc/stat over 0.5 s))"
    ]
    full = dict(sampled, threads=1, busy_cores=1.8, busy=True)
    monkeypatch.setattr(report, "thread_settings", lambda: full)
    notes = report.start_notes(load_pretrain_config("demo", None), cpu)
    assert notes[1] == (
        "warning: other processes kept 1.8 of 2 usable cores busy (/proc/stat over 0.5 s), so this run is slower "
        "than the README's figures"
    )


def test_readme_demo_transcript_start_lines_are_what_the_code_prints(monkeypatch):
    """The README's demo transcript shows the thread rule's start lines as the code prints them now: the busy-core
    figure read from the README goes through the thread rule (choose_threads, /proc/stat measured) and start_notes;
    the README's two lines must come out word for word (a changed message fails here until the README follows)."""
    import re

    import simsiam_kit.engine.report as report
    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.utils import device

    text = (REPO / "README.md").read_text()
    block = text.split("run directory: /tmp/demo15\n", 1)[1].split("```", 1)[0].splitlines()
    shown = [ln for ln in block if ln.startswith(("images 16 px", "warning: "))]
    assert len(shown) == 2, shown
    busy = float(re.search(r"other processes kept ([0-9.]+) of 2 usable cores busy", shown[0]).group(1))
    monkeypatch.setattr(device, "measure_busy_cores", lambda seconds=0.5: busy)
    choice = device.choose_threads(env={}, cores=2)
    assert (choice["threads"], choice["busy"]) == (1, True)  # what the transcript says: 1 thread, and the warning
    monkeypatch.setattr(report, "thread_settings", lambda: choice)
    assert report.start_notes(load_pretrain_config("demo", None), torch.device("cpu")) == shown


@pytest.mark.parametrize(
    "values, baseline, want",
    [
        ([59.9, 61.2], 56.6, (53.9, 63.9)),  # the demo's 1.3-point wobble: 10 points around data and baseline
        ([10.0, 80.0], 5.0, (1.25, 83.75)),  # wide data: 5% margins
        ([1.0, 2.0], None, (0.0, 10.0)),  # never below 0
        ([99.0, 99.5], None, (90.0, 100.0)),  # never above 100
    ],
)
def test_knn_plot_range(values, baseline, want):
    from simsiam_kit.plots import knn_ylim

    assert knn_ylim(values, baseline) == pytest.approx(want)


def test_knn_plot_starts_at_epoch_zero(ctx, tmp_path, monkeypatch):
    import matplotlib.axes

    from simsiam_kit.plots import plot_pretrain_metrics

    seen = {}
    real_plot, real_hline = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axhline

    def plot(self, xs, ys, *a, **k):
        seen.setdefault("plots", []).append((list(xs), list(ys)))
        return real_plot(self, xs, ys, *a, **k)

    def axhline(self, y, *a, **k):
        seen.setdefault("hlines", []).append((y, k.get("label")))
        return real_hline(self, y, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", axhline)
    plot_pretrain_metrics(ctx / "run" / "metrics.jsonl", tmp_path, dim=64)
    summary = json.loads((ctx / "run" / "results" / "pretrain.json").read_text())
    knn_xs = [xs for xs, ys in seen["plots"] if xs == [0, 1, 2]]
    assert knn_xs, seen["plots"]
    assert (summary["knn_top1_random_init"], "random init (epoch 0)") in seen["hlines"]
    assert (tmp_path / "knn.png").stat().st_size > 1000
