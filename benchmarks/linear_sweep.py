"""Cost of the linear-probe lr sweep (20 heads in one pass) against one head, on the same cached features.

    python benchmarks/linear_sweep.py [--images 5000] [--epochs 30] [--repeats 3]

Features: a ResNet-18 (CIFAR stem, seed 0) on CIFAR-10 (JPEG copy) ``val.npz`` images, extracted once;
the first 80 % train the heads, the rest is the test set. Timed: training only (features cached), one
head (``train_linear_head``, the default probe) vs the sweep (``run_sweep``: 10 base lrs x 2 weight decays,
held-out 10 % for the choice), same epochs and batch; medians of ``--repeats`` runs, alternated.
Writes ``benchmarks/results/linear_sweep.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, print_table, write_json  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)

    from simsiam_kit.data import load_dataset
    from simsiam_kit.evaluation.linear import TensorLoader, evaluate_head, make_head, train_linear_head
    from simsiam_kit.evaluation.linear_sweep import run_sweep
    from simsiam_kit.features import extract_features
    from simsiam_kit.models import build_backbone

    load0 = os.getloadavg()[0]
    ds = load_dataset(f"{SHARED_DATA / 'cifar10' / 'val.npz'}[:{a.images}]")
    torch.manual_seed(0)
    bb = build_backbone("resnet18", "cifar")
    t = time.perf_counter()
    f, y, _ = extract_features(
        bb,
        ds,
        torch.device("cpu"),
        batch_size=256,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        normalize=False,
    )
    extract_s = time.perf_counter() - t
    n = int(0.8 * len(y))
    ft, yt, fq, yq = f[:n], y[:n], f[n:], y[n:]
    one, sweep, acc = [], [], {}
    for _ in range(a.repeats):
        torch.manual_seed(0)
        head = make_head(f.shape[1], 10)
        t = time.perf_counter()
        train_linear_head(
            head,
            TensorLoader(ft, yt, a.batch, seed=0),
            lambda b: b["features"],
            a.epochs,
            base_lr=0.1,
            batch_size=a.batch,
        )
        one.append(time.perf_counter() - t)
        acc["one head (lr 0.1, wd 0)"] = evaluate_head(head, fq, yq)["top1"]
        t = time.perf_counter()
        res = run_sweep(ft, yt, 10, a.epochs, a.batch, torch.device("cpu"))
        sweep.append(time.perf_counter() - t)
        h = res.bank.head(res.selected)
        acc["sweep (selected head)"] = evaluate_head(h, fq, yq)["top1"]
        chosen = res.grid[res.selected]
    rows = [
        {
            "run": "one head",
            "heads": 1,
            "median_s": statistics.median(one),
            "test_top1": acc["one head (lr 0.1, wd 0)"],
        },
        {
            "run": "lr sweep",
            "heads": len(res.grid),
            "median_s": statistics.median(sweep),
            "test_top1": acc["sweep (selected head)"],
            "selected": f"lr {chosen['lr']:g}, wd {chosen['weight_decay']:g}",
        },
    ]
    rows[1]["x_one_head"] = rows[1]["median_s"] / rows[0]["median_s"]
    print_table(rows, ["run", "heads", "median_s", "x_one_head", "test_top1", "selected"])
    write_json(
        "linear_sweep.json",
        {
            "images": a.images,
            "train": n,
            "test": len(y) - n,
            "epochs": a.epochs,
            "batch": a.batch,
            "feature_extract_s": round(extract_s, 1),
            "rows": rows,
            "one_head_s": one,
            "sweep_s": sweep,
            "load_before": load0,
            "load_after": os.getloadavg()[0],
        },
    )


if __name__ == "__main__":
    main()
