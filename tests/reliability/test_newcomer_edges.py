"""Issue 24 (part B), a newcomer's rough edges: ``--version``, help texts that describe the command they are
in, TensorBoard that says at start when it is off and why (and ``eval knn`` writing the ``tensorboard/`` the
README promises), plot labels that say what they show, and the run/random-init comparison that says why it is
missing. Each test failed on the code before the fix."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import simsiam_kit

from helpers import REPO, cli, tiny_overrides


def test_version_prints_the_package_version():
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout == f"simsiam-kit {simsiam_kit.__version__}\n", r.output
    p = subprocess.run(
        [sys.executable, "-m", "simsiam_kit", "--version"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert p.returncode == 0 and p.stdout.strip() == f"simsiam-kit {simsiam_kit.__version__}", p.stderr


@pytest.mark.parametrize(
    "command, absent, present",
    [
        (["eval", "detection"], ["--like"], ["--arch"]),
        (["eval", "linear"], ["kNN bank", "queries"], ["the head learns on", "the trained head is scored on"]),
        (["eval", "knn"], [], ["the kNN bank", "the queries"]),
        (["export", "onnx"], [], ["'random'", "--overwrite"]),
    ],
)
def test_help_describes_the_command_it_is_in(command, absent, present):
    r = cli(*command, "--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())  # help is wrapped: compare words, not lines
    for a in absent:
        assert a not in text, (a, text)
    for p in present:
        assert p in text, (p, text)


def _capture(monkeypatch, seen: dict):
    """Record titles, legend labels, cell texts and colour bar labels the plots draw."""
    import matplotlib.axes
    import matplotlib.figure

    real = {
        "plot": matplotlib.axes.Axes.plot,
        "set_title": matplotlib.axes.Axes.set_title,
        "text": matplotlib.axes.Axes.text,
        "colorbar": matplotlib.figure.Figure.colorbar,
    }

    def plot(self, *a, **k):
        seen.setdefault("labels", []).append(k.get("label"))
        return real["plot"](self, *a, **k)

    def set_title(self, t, *a, **k):
        seen.setdefault("titles", []).append(t)
        return real["set_title"](self, t, *a, **k)

    def text(self, x, y, s, *a, **k):
        seen.setdefault("texts", []).append(s)
        return real["text"](self, x, y, s, *a, **k)

    def colorbar(self, *a, **k):
        seen.setdefault("colorbars", []).append((k.get("label"), k.get("format")))
        return real["colorbar"](self, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", set_title)
    monkeypatch.setattr(matplotlib.axes.Axes, "text", text)
    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", colorbar)


def test_pretrain_says_tensorboard_is_off_and_titles_knn_png(shared_tiny_npz, tmp_path, monkeypatch):
    seen: dict = {}
    _capture(monkeypatch, seen)
    npz = str(shared_tiny_npz)
    overrides = tiny_overrides(npz, npz) + ["train.plots=true", "log.tensorboard=false", "train.max_steps_per_epoch=1"]
    r = cli("pretrain", "--output", tmp_path / "run", sets=overrides)
    assert r.exit_code == 0, r.output
    assert "note: TensorBoard is off (log.tensorboard=false)" in r.stdout, r.stdout
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert "kNN monitor (k=5, T=0.1, queries tiny.npz)" in seen["titles"], seen["titles"]


def test_eval_says_tensorboard_is_not_installed(shared_tiny_npz, tmp_path, monkeypatch):
    import simsiam_kit.engine.loggers as loggers

    monkeypatch.setattr(loggers, "tensorboard_available", lambda: False)
    npz = str(shared_tiny_npz)
    args = ["eval", "knn", "--weights", "random", "--arch", "resnet18", "--stem", "cifar", "--image-size", "16"]
    r = cli(*args, "--train-data", npz, "--test-data", npz, "--k", "5", "--no-plots", "--output", tmp_path / "k")
    assert r.exit_code == 0, r.output
    assert "note: TensorBoard is off: the tensorboard package is not installed" in r.stdout, r.stdout
    assert not (tmp_path / "k" / "tensorboard").exists()


def test_eval_knn_writes_its_scalars_to_tensorboard(shared_tiny_npz, tmp_path):
    """The README's run layout: each evaluation with its own results.json and tensorboard/."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    npz = str(shared_tiny_npz)
    args = ["eval", "knn", "--weights", "random", "--arch", "resnet18", "--stem", "cifar", "--image-size", "16"]
    r = cli(*args, "--train-data", npz, "--test-data", npz, "--k", "5", "--no-plots", "--output", tmp_path / "k")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "k" / "results.json").read_text())
    acc = EventAccumulator(str(tmp_path / "k" / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("knn/top1")[0].value == pytest.approx(res["top1"])
    assert acc.Scalars("knn/map_at_r")[0].value == pytest.approx(res["map_at_r"])


def test_linear_curves_say_whether_training_accuracy_is_augmented(shared_tiny_npz, tmp_path, monkeypatch):
    seen: dict = {}
    _capture(monkeypatch, seen)
    npz = str(shared_tiny_npz)
    args = ["eval", "linear", "--weights", "random", "--arch", "resnet18", "--stem", "cifar", "--image-size", "16"]
    args += ["--train-data", npz, "--test-data", npz, "--epochs", "2", "--no-progress", "--cached-features"]
    r = cli(*args, "--output", tmp_path / "lin")
    assert r.exit_code == 0, r.output
    assert "train top-1 (cached features, not augmented)" in seen["labels"], seen["labels"]
    assert not any(lb and "augmented crops" in lb for lb in seen["labels"])


def test_confusion_matrix_cells_and_colour_bar_are_percent_of_the_true_class(tmp_path, monkeypatch):
    from simsiam_kit.evaluation.knn import plot_confusion

    seen: dict = {}
    _capture(monkeypatch, seen)
    cm = np.array([[3, 1], [0, 4]])  # class a: 3 of 4 right (75 %), 1 taken for b (25 %); class b: 4 of 4
    plot_confusion(cm, ["a", "b"], tmp_path / "cm.png", "kNN")
    assert sorted(seen["texts"]) == ["100%", "25%", "75%"]
    assert seen["colorbars"] == [("% of the true class", "%.0f%%")]


def test_comparison_with_the_random_init_says_why_it_is_missing(tiny_run, shared_tiny_npz, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    npz = str(shared_tiny_npz)
    args = ["--train-data", npz, "--test-data", npz, "--k", "5", "--no-plots"]
    r = cli("eval", "knn", "--weights", run, *args)
    assert r.exit_code == 0, r.output
    want = f"no comparison with the run's random init: no results at {run / 'eval' / 'knn-random-init'} yet"
    assert want in r.stdout, r.stdout
    r = cli("eval", "knn", "--weights", "random", "--like", run, *args, "--temperature", "0.07")
    assert r.exit_code == 0, r.output
    assert "no comparison with the run's trained backbone:" in r.stdout and "differs in" in r.stdout, r.stdout


def test_lr_sweeps_are_compared_at_each_ones_chosen_lr(tmp_path):
    """A sweep picks each backbone's own lr: the random init's row used to vanish, without a word, whenever it
    chose another lr than the trained backbone."""
    from simsiam_kit.evaluation.common import baseline_table

    run = tmp_path / "run"

    def res(weights, lr, top1, protocol="cached-features, lr sweep"):
        settings = {"train_data": "t", "test_data": "q", "lr": lr, "protocol": protocol}
        return {"weights": weights, "settings": settings, "top1": top1, "top5": 99.0}

    other = run / "eval" / "linear-random-init"
    other.mkdir(parents=True)
    random_init = res({"kind": "random", "like": str(run), "seed": 0}, 3.0, 30.0)
    (other / "results.json").write_text(json.dumps(random_init))
    text = baseline_table("linear", res({"run_dir": str(run)}, 0.3, 80.0))
    assert text is not None and "random init (run, seed 0)" in text and "80.00" in text, text
    # one --lr given (no sweep): both must have used it, else the line says which setting differs
    (other / "results.json").write_text(json.dumps(res(random_init["weights"], 3.0, 30.0, "cached-features")))
    text = baseline_table("linear", res({"run_dir": str(run)}, 0.3, 80.0, "cached-features"))
    assert text.startswith("no comparison with the run's random init:"), text
    assert "differs in lr (lr: 0.3 here, 3.0 there)" in text, text


def test_pretrain_json_records_the_threads_and_the_cpu(tiny_run):
    """The demo's last digits move with both (README): each run records them."""
    from simsiam_kit.utils.device import cpu_facts

    summary = json.loads((tiny_run / "results" / "pretrain.json").read_text())
    assert summary["threads"]["threads"] >= 1
    assert summary["cpu"] == cpu_facts() and set(summary["cpu"]["flags"]) >= {"avx512_bf16", "amx_bf16"}
