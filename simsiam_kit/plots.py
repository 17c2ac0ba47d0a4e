"""PNG plots from metrics.jsonl (matplotlib imported lazily, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pretrain_metrics(metrics_path: Path, out_dir: Path, dim: int = 2048) -> list[Path]:
    """loss.png, std.png (with the 1/sqrt(d) line), knn.png, lr.png; returns the files written."""
    from simsiam_kit.engine.hooks import read_metrics

    recs = read_metrics(metrics_path)
    steps = [r for r in recs if r.get("type") == "step"]
    epochs = [r for r in recs if r.get("type") == "epoch"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    written = []

    def fig(name, xs, ys, xlabel, ylabel, title, hline=None, hlabel=None, ylim=None):
        if not xs:
            return
        f, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        if hline is not None:
            ax.axhline(hline, ls="--", c="gray", lw=1, label=hlabel)
            ax.legend(loc="best", fontsize=8)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        f.tight_layout()
        p = out_dir / name
        f.savefig(p)
        plt.close(f)
        written.append(p)

    src = steps if len(steps) >= 2 else epochs
    fig("loss.png", [r["step"] for r in src if "loss" in r], [r["loss"] for r in src if "loss" in r], "step", "loss",
        "SimSiam loss (min -1)")
    fig("std.png", [r["step"] for r in src if "std" in r], [r["std"] for r in src if "std" in r], "step",
        "std of l2-normalised z", "output std (collapse indicator)", hline=1 / math.sqrt(dim),
        hlabel=f"1/sqrt({dim})", ylim=(0, max([r["std"] for r in src if "std" in r] + [1.5 / math.sqrt(dim)]) * 1.1))
    knn = [r for r in epochs if r.get("knn_top1") is not None]
    fig("knn.png", [r["epoch"] for r in knn], [r["knn_top1"] for r in knn], "epoch", "kNN top-1 (%)", "kNN monitor")
    lr = [r for r in src if r.get("lr") is not None]
    fig("lr.png", [r["step"] for r in lr], [r["lr"] for r in lr], "step", "learning rate", "learning rate")
    return written
