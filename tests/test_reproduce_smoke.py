"""Code paths of benchmarks/reproduce/ (no training): the budget loop's bookkeeping, and the collapse figure
drawn only when both ablation results exist, with the baseline once."""

import json
import sys

from helpers import REPO

REPRO = REPO / "benchmarks" / "reproduce"
sys.path.insert(0, str(REPRO))


def _run(name, knn):
    return {
        "name": name,
        "proj_dim": 4,
        "setting": {"arch": "resnet18", "stem": "imagenet", "image_size": 16, "batch": 32},
        "steps": [{"step": 2, "loss": -0.1, "std": 0.5}, {"step": 4, "loss": -0.9, "std": 0.1}],
        "epochs": [{"epoch": 0, "knn_top1": 20.0}, {"epoch": 1, "loss": -0.9, "std": 0.1, "knn_top1": knn}],
    }


def test_collapse_figure_needs_both_ablations(tmp_path, monkeypatch):
    import _repro

    drawn = []
    monkeypatch.setattr(_repro, "plot_runs", lambda runs, out, title: drawn.append([r["name"] for r in runs]) or out)
    (tmp_path / "stop_gradient.json").write_text(
        json.dumps({"runs": [_run("baseline", 30.0), _run("no_stop_gradient", 10.0)]})
    )
    assert _repro.collapse_figure(tmp_path, tmp_path / "c.png") is None  # predictor.json missing
    (tmp_path / "predictor.json").write_text(json.dumps({"runs": [_run("baseline", 30.0), _run("no_predictor", 11.0)]}))
    assert _repro.collapse_figure(tmp_path, tmp_path / "c.png") == tmp_path / "c.png"
    assert drawn == [["baseline", "no_stop_gradient", "no_predictor"]]


def test_plot_runs_writes_png(tmp_path):
    import _repro

    out = _repro.plot_runs([_run("baseline", 30.0), _run("no_stop_gradient", 10.0)], tmp_path / "p.png", "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_loop_checkpoints_and_counts(monkeypatch):
    import time_to_accuracy as tta  # the budget loop itself needs no lightly (only run_lightly does)

    clock = {"t": 0.0}
    monkeypatch.setattr(tta.time, "perf_counter", lambda: clock["t"])

    def step():  # each step "takes" 1.5 s of training time and sees 8 images
        clock["t"] += 1.5
        return 8, -0.5

    evals, lrs = [], []
    res = tta.budget_loop(
        "x",
        step,
        None,
        lambda bb: evals.append(1) or 42.0,
        budget_s=6.0,
        checkpoints=2,
        set_lr=lrs.append,
        log=lambda m: None,
    )
    # checkpoints at 3 s and 6 s: steps end at 1.5, 3.0 (eval), 4.5, 6.0 (eval, stop)
    assert [p["steps"] for p in res["curve"]] == [0, 2, 4]
    assert [p["images"] for p in res["curve"]] == [0, 16, 32]
    assert len(evals) == 3 and res["steps"] == 4 and res["train_s"] == 6.0
    assert lrs == [0.0, 0.25, 0.5, 0.75]  # fraction of the budget used before each step
