"""Helpers shared by the reproduction scripts: paths, machine/load description, running a pretraining
variant through :func:`simsiam_kit.pretrain.run_pretrain`, and the per-epoch plots."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from _common import SHARED_DATA, machine  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "reproduce"
IMG = REPO / "docs" / "img"
CIFAR = SHARED_DATA / "cifar10"

COLORS = {"baseline": "tab:blue", "no_stop_gradient": "tab:red", "no_predictor": "tab:orange"}
LABELS = {
    "baseline": "SimSiam (stop-grad + predictor)",
    "no_stop_gradient": "no stop-gradient",
    "no_predictor": "no predictor",
}


def load_info() -> dict:
    """Load average and core count: the machine is shared, timings depend on it."""
    la = os.getloadavg()
    return {"loadavg_1_5_15": [round(x, 2) for x in la], "cores": os.cpu_count(), "at": time.strftime("%H:%M:%S")}


def data_overrides(train_images: int, val_images: int, bank: int) -> list[str]:
    if not (CIFAR / "train.npz").is_file():
        raise SystemExit(f"CIFAR-10 npz files not found under {CIFAR}")
    return [
        f"data.train={CIFAR / 'train.npz'}[:{train_images}]",
        f"data.val={CIFAR / 'val.npz'}[:{val_images}]",
        f"train.knn_bank_limit={bank}",
    ]


def run_variant(name: str, config: str, overrides: list[str], work: Path, log=print) -> dict:
    """Train one variant with the toolkit's own pretraining entry point; return its per-epoch curves."""
    import shutil

    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.engine.hooks import read_metrics
    from simsiam_kit.pretrain import run_pretrain

    cfg = load_pretrain_config(config, overrides)
    out = Path(work) / name
    if out.exists():
        shutil.rmtree(out)
    before = load_info()
    t0 = time.time()
    summary = run_pretrain(cfg, output=out, log=lambda m: log(f"[{name}] {m}"))
    wall = time.time() - t0
    recs = read_metrics(out / "metrics.jsonl")
    epochs = [r for r in recs if r.get("type") == "epoch"]
    steps = [r for r in recs if r.get("type") == "step"]
    res = {
        "name": name,
        "config": config,
        "overrides": overrides,
        "run_dir": str(out),
        "wall_s": round(wall, 1),
        "load_before": before,
        "load_after": load_info(),
        "summary": summary,
        "proj_dim": cfg.model.proj_dim,
        "setting": {
            "arch": cfg.model.arch,
            "stem": cfg.model.stem,
            "image_size": cfg.data.image_size,
            "batch": cfg.optim.batch_size,
            "epochs": cfg.optim.epochs,
            "lr": cfg.optim.base_lr * cfg.optim.batch_size / 256,
            "train": cfg.data.train,
            "val": cfg.data.val,
            "knn_bank": cfg.train.knn_bank_limit,
            "predictor": cfg.model.predictor,
            "stop_gradient": cfg.model.stop_gradient,
        },
        # epoch 0 = the same backbone at random init (the kNN value run_pretrain reports next to the final one)
        "epochs": [{"epoch": 0, "knn_top1": summary.get("knn_top1_random_init")}]
        + [
            {
                k: r.get(k)
                for k in ("epoch", "step", "loss", "std", "std_x_sqrt_d", "knn_top1", "images_per_s", "time_s")
            }
            for r in epochs
        ],
        "steps": [{k: r.get(k) for k in ("step", "loss", "std")} for r in steps],
    }
    last = res["epochs"][-1]
    log(
        f"[{name}] done in {wall:.0f}s: loss {last.get('loss')}, std*sqrt(d) {last.get('std_x_sqrt_d')}, "
        f"kNN {last.get('knn_top1')} (random init {summary.get('knn_top1_random_init')})"
    )
    return res


def report(runs: list[dict], args, name: str, experiment: str, title: str) -> None:
    """Print the runs' summary table, write ``<results>/<name>.json`` and ``<img>/<name>.png``, and
    redraw the collapse figure (drawn once both ablations' results exist)."""
    print(f"\n{'run':<18} {'final loss':>10} {'std*sqrt(d)':>12} {'kNN top-1':>10} {'kNN init':>9} {'img/s':>7}")
    for r in runs:
        e = r["epochs"][-1]
        print(
            f"{r['name']:<18} {e['loss']:>10.4f} {e['std_x_sqrt_d']:>12.3f} {e['knn_top1']:>10.2f} "
            f"{r['epochs'][0]['knn_top1']:>9.2f} {e['images_per_s']:>7.1f}"
        )
    res_dir, img_dir = Path(args.results), Path(args.img)
    write_json(res_dir / f"{name}.json", {"experiment": experiment, "load_end": load_info(), "runs": runs})
    s = runs[0]["setting"]
    plot_runs(
        runs,
        img_dir / f"{name}.png",
        f"{title}, CIFAR-10 (JPEG copy) [:{args.train_images}], {s['arch']} {s['stem']} stem "
        f"{s['image_size']} px, batch {s['batch']}, {args.epochs} epochs",
    )
    collapse_figure(res_dir, img_dir / "collapse.png")


def write_json(path: Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def read_json(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: list[dict], out: Path, title: str) -> Path:
    """Three panels: loss per step, std of the l2-normalised z per step (1/sqrt(d) line), kNN per epoch."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    dim = runs[0]["proj_dim"]
    for r in runs:
        c, lab = COLORS.get(r["name"]), LABELS.get(r["name"], r["name"])
        st = [s for s in r["steps"] if s.get("loss") is not None]
        if not st:  # fall back to epoch records
            st = [e for e in r["epochs"] if e.get("loss") is not None]
        axes[0].plot([s["step"] for s in st], [s["loss"] for s in st], c=c, label=lab)
        axes[1].plot([s["step"] for s in st], [s["std"] for s in st], c=c, label=lab)
        kn = [e for e in r["epochs"] if e.get("knn_top1") is not None]
        axes[2].plot([e["epoch"] for e in kn], [e["knn_top1"] for e in kn], c=c, marker="o", ms=3, label=lab)
    axes[0].set(xlabel="training step", ylabel="loss", title="SimSiam loss (minimum -1)")
    axes[1].axhline(1 / math.sqrt(dim), ls="--", c="gray", lw=1, label=f"1/sqrt({dim})")
    axes[1].set(xlabel="training step", ylabel="std of l2-normalised z", title="output std")
    top = max([s["std"] for r in runs for s in r["steps"] if s.get("std") is not None] + [1 / math.sqrt(dim)])
    axes[1].set_ylim(0, top * 1.15)
    axes[2].axhline(10, ls=":", c="gray", lw=1, label="chance (10%)")
    axes[2].set(xlabel="epoch (0 = random init)", ylabel="kNN top-1 (%)", title="kNN accuracy (k=200, T=0.1)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    axes[2].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    print(f"wrote {out}")
    return out


def collapse_figure(results_dir: Path = RESULTS, out: Path = IMG / "collapse.png") -> Path | None:
    """The headline figure: baseline, no stop-gradient and no predictor together, from the two ablations'
    JSON files (drawn when both exist)."""
    sg = read_json(Path(results_dir) / "stop_gradient.json")
    pr = read_json(Path(results_dir) / "predictor.json")
    if sg is None or pr is None:
        return None
    runs = [r for r in sg["runs"]] + [r for r in pr["runs"] if r["name"] != "baseline"]
    s = runs[0]["setting"]
    title = (
        f"SimSiam collapse ablations, CIFAR-10 (JPEG copy) subset, {s['arch']} {s['stem']} stem at "
        f"{s['image_size']} px, batch {s['batch']}, 2 CPU cores"
    )
    return plot_runs(runs, out, title)
