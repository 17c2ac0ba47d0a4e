"""Cost of the online linear probe: pretraining steps with and without it, same builder, same data.

    python benchmarks/online_probe.py [--steps 8] [--batch 128] [--images 2048]

The ``cifar10_resnet18`` recipe on CIFAR-10 (JPEG copy) images (``val.npz``, first ``--images``), built by
``build_pretraining`` with ``train.online_probe`` true and false; blocks of steps alternate between the two
(so load from other processes hits both alike); medians of per-step times after 2 warm-up steps. The
per-epoch val pass of the probe is reported separately (one extraction of ``--val`` images).
Writes ``benchmarks/results/online_probe.json``.
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
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--val", type=int, default=1000)
    a = ap.parse_args(argv)

    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.pretrain import build_pretraining, make_probe_eval

    npz = SHARED_DATA / "cifar10" / "val.npz"
    load0 = os.getloadavg()[0]
    parts = {}
    for probe in (True, False):
        cfg = load_pretrain_config(
            "cifar10_resnet18",
            [
                f"data.train={npz}[:{a.images}]",
                f"data.val={npz}[{a.images}:{a.images + a.val}]",
                f"optim.batch_size={a.batch}",
                "train.device=cpu",
                f"train.online_probe={str(probe).lower()}",
            ],
        )
        torch.manual_seed(0)
        parts[probe] = build_pretraining(cfg, torch.device("cpu"))

    class T:
        epoch, global_step = 0, 0

    iters = {k: iter(p.data.loader) for k, p in parts.items()}
    times = {True: [], False: []}

    def step(k):
        try:
            b = next(iters[k])
        except StopIteration:
            iters[k] = iter(parts[k].data.loader)
            b = next(iters[k])
        t = time.perf_counter()
        parts[k].step(b, T)
        return time.perf_counter() - t

    for k in (True, False):
        for _ in range(2):
            step(k)
    for _ in range(a.blocks):
        for k in (True, False):
            times[k] += [step(k) for _ in range(a.steps)]
    t = time.perf_counter()
    top1 = make_probe_eval(parts[True], batch_size=256)()
    val_s = time.perf_counter() - t
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        {"run": "without probe", "median_step_s": med[False], "images_per_s": a.batch / med[False]},
        {
            "run": "with probe",
            "median_step_s": med[True],
            "images_per_s": a.batch / med[True],
            "overhead": med[True] / med[False] - 1,
        },
    ]
    print_table(rows, ["run", "median_step_s", "images_per_s", "overhead"])
    print(f"probe val pass ({a.val} images): {val_s:.2f} s (top-1 {top1:.1f} %, untrained)")
    write_json(
        "online_probe.json",
        {
            "batch": a.batch,
            "images": a.images,
            "rows": rows,
            "val_images": a.val,
            "val_pass_s": round(val_s, 2),
            "steps_with": times[True],
            "steps_without": times[False],
            "load_before": load0,
            "load_after": os.getloadavg()[0],
        },
    )


if __name__ == "__main__":
    main()
