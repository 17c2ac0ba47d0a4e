"""PNG plots from metrics.jsonl (matplotlib imported lazily, Agg backend).

The kNN plot starts at epoch 0 (the run's initial weights, scored by the kNN monitor before training),
draws that random-init level as a line, and uses a y-range of at least :data:`KNN_MIN_SPAN` points that
holds every point and the baseline (:func:`knn_ylim`), so noise of a point or two does not look like a cliff.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from simsiam_kit.utils.io import atomic_savefig

KNN_MIN_SPAN = 10.0  # percentage points: the smallest y-range of the kNN plot


def knn_ylim(
    values: Sequence[float], baseline: Optional[float] = None, min_span: float = KNN_MIN_SPAN, margin: float = 0.05
) -> tuple[float, float]:
    """The kNN plot's y-range: every value and the baseline inside, at least ``min_span`` points (centred on
    the data), ``margin`` of the span added on each side when the data span more, within [0, 100]."""
    pts = [float(v) for v in values] + ([float(baseline)] if baseline is not None else [])
    lo, hi = min(pts), max(pts)
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    else:
        pad = (hi - lo) * margin
        lo, hi = lo - pad, hi + pad
    if lo < 0:
        lo, hi = 0.0, min(100.0, hi - lo)
    if hi > 100:
        lo, hi = max(0.0, lo - (hi - 100)), 100.0
    return lo, hi


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pretrain_metrics(
    metrics_path: Path,
    out_dir: Path,
    dim: int = 2048,
    baseline: Optional[float] = None,
    knn_setting: Optional[str] = None,
) -> list[Path]:
    """loss.png, std.png (with the 1/sqrt(d) line), knn.png (epoch 0 and the random-init line; ``baseline``
    when metrics.jsonl has no epoch-0 point; ``knn_setting``, e.g. ``k=200, T=0.1, val.npz``, in its title),
    lr.png; returns the files written."""
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
        atomic_savefig(f, p)
        plt.close(f)
        written.append(p)

    src = steps if len(steps) >= 2 else epochs
    fig(
        "loss.png",
        [r["step"] for r in src if "loss" in r],
        [r["loss"] for r in src if "loss" in r],
        "step",
        "loss",
        "SimSiam loss (min -1)",
    )
    fig(
        "std.png",
        [r["step"] for r in src if "std" in r],
        [r["std"] for r in src if "std" in r],
        "step",
        "std of l2-normalised z",
        "output std (collapse indicator)",
        hline=1 / math.sqrt(dim),
        hlabel=f"1/sqrt({dim})",
        ylim=(0, max([r["std"] for r in src if "std" in r] + [1.5 / math.sqrt(dim)]) * 1.1),
    )
    knn = [r for r in epochs if r.get("knn_top1") is not None]
    if knn:
        base = next((r["knn_top1"] for r in knn if r["epoch"] == 0), baseline)
        ys = [r["knn_top1"] for r in knn]
        fig(
            "knn.png",
            [r["epoch"] for r in knn],
            ys,
            "epoch (0 = initial weights)",
            "kNN top-1 (%)",
            f"kNN monitor ({knn_setting})" if knn_setting else "kNN monitor",
            hline=base,
            hlabel="random init (epoch 0)" if base is not None else None,
            ylim=knn_ylim(ys, base),
        )
    lr = [r for r in src if r.get("lr") is not None]
    fig("lr.png", [r["step"] for r in lr], [r["lr"] for r in lr], "step", "learning rate", "learning rate")
    return written
