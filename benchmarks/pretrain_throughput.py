"""Pretraining throughput: simsiam-kit vs lightly's SimSiam, and the bare compute ceiling.

    python benchmarks/pretrain_throughput.py [--steps 6] [--batch 256] [--images 4096] [--skip-lightly]

Setting (the issue's): ResNet-18 with the CIFAR stem, 32 px, batch 256, the CIFAR recipe (2-layer
projector 2048-d, predictor 2048-512-2048, SGD lr 0.03 x 256/256, wd 5e-4, momentum 0.9), images of
CIFAR-10 (JPEG copy, ``../shared/data/cifar10/train.npz``, first ``--images``). Data loading and
augmentation are inside the timed steps for both tools. Images/s counts source images (two views each).

Rows:
* simsiam-kit default: what ``simsiam-kit pretrain`` runs (in-memory batches, batched augmentation,
  bf16 autocast + channels_last where the CPU has AVX512-BF16/AMX, else fp32).
* simsiam-kit fp32: ``--set train.precision=fp32 --set train.channels_last=false``.
* lightly: lightly 1.6.0 as in its SimSiam example: ``SimSiamTransform(input_size=32)`` (its defaults,
  which include blur), torchvision ``LightlyDataset``-style per-image PIL pipeline in a
  ``DataLoader`` (num_workers = cores, drop_last), ``SimSiamProjectionHead(512, 2048, 2048)``,
  ``SimSiamPredictionHead(2048, 512, 2048)``, ``NegativeCosineSimilarity``, plain fp32 loop, on the
  same CIFAR-stem ResNet-18 backbone (so the networks cost the same).
* ceiling: the same SimSiam model's forward+backward+SGD step on random tensors already in memory
  (same precision and memory format as the default row, no data loading, no augmentation).

Median step time over ``--steps`` steps after 2 warm-up steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, median_time, print_table, write_json  # noqa: E402

from simsiam_kit.config import load_pretrain_config  # noqa: E402


def time_steps(step_fn, steps: int) -> list[float]:
    """Per-step seconds of ``steps`` steps after 2 untimed warm-up steps."""
    return median_time(step_fn, steps, warmup=2)[1]


def ours(images: np.ndarray, batch: int, steps: int, precision: str, channels_last):
    """What ``simsiam-kit pretrain`` runs, built by the same builder (:func:`build_pretraining`)."""
    from simsiam_kit.data.datasets import ImageDataset
    from simsiam_kit.pretrain import build_pretraining

    cfg = load_pretrain_config(
        "cifar10_resnet18",
        [
            f"train.precision={precision}",
            f"optim.batch_size={batch}",
            f"train.channels_last={'null' if channels_last is None else channels_last}",
            "train.device=cpu",
            "data.val=null",
        ],
    )
    torch.manual_seed(0)
    ds = ImageDataset("bench", np.zeros(len(images), np.int64), list(range(len(images))), images=images)
    p = build_pretraining(cfg, torch.device("cpu"), dataset=ds)

    class T:  # minimal trainer stand-in for the step function
        epoch, global_step = 0, 0

    state = {"it": iter(p.data.loader), "epoch": 0}

    def one():
        try:
            b = next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            p.data.loader.set_epoch(state["epoch"])
            state["it"] = iter(p.data.loader)
            b = next(state["it"])
        p.step(b, T)

    return time_steps(one, steps), p.precision.name, p.channels_last, p.model


def ceiling(model, batch: int, steps: int, precision: str, channels_last: bool):
    from simsiam_kit.losses import simsiam_loss
    from simsiam_kit.utils.device import Precision

    prec = Precision(precision, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    x1 = torch.randn(batch, 3, 32, 32).contiguous(memory_format=mf)
    x2 = torch.randn(batch, 3, 32, 32).contiguous(memory_format=mf)

    def one():
        with prec.autocast():
            p1, p2, z1, z2 = model(x1, x2)
            loss = simsiam_loss(p1, p2, z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return time_steps(one, steps)


def lightly_run(images: np.ndarray, batch: int, steps: int, workers: int):
    from _lightly_peer import lightly_example

    from simsiam_kit.models import build_backbone

    torch.manual_seed(0)
    _, dl, step = lightly_example(images, build_backbone("resnet18", "cifar"), batch, workers)
    state = {"it": iter(dl)}

    def one():
        try:
            views, _ = next(state["it"])
        except StopIteration:
            state["it"] = iter(dl)
            views, _ = next(state["it"])
        step(views)

    return time_steps(one, steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-lightly", action="store_true")
    ap.add_argument("--out", default="pretrain_throughput.json")
    args = ap.parse_args()

    with np.load(SHARED_DATA / "cifar10" / "train.npz") as d:
        images = np.ascontiguousarray(d["images"][: args.images])
    b = args.batch
    rows, raw = [], {}

    def add(name, times, precision, cl, note=""):
        med = statistics.median(times)
        raw[name] = times
        rows.append(
            {
                "setting": name,
                "precision": precision,
                "channels_last": cl,
                "median_step_s": med,
                "images_per_s": b / med,
                "note": note,
            }
        )
        print(f"  {name}: {b / med:.1f} images/s", flush=True)

    t, prec, cl, model = ours(images, b, args.steps, "auto", None)
    add("simsiam-kit default", t, prec, cl, "data + batched aug included")
    add(
        "ceiling (same model, random tensors)",
        ceiling(model, b, args.steps, prec, cl),
        prec,
        cl,
        "forward+backward+SGD only",
    )
    t, _, _, model32 = ours(images, b, args.steps, "fp32", False)
    add("simsiam-kit fp32", t, "fp32", False, "data + batched aug included")
    add("ceiling fp32", ceiling(model32, b, args.steps, "fp32", False), "fp32", False, "forward+backward+SGD only")
    if not args.skip_lightly:
        add(
            "lightly 1.6.0 (example loop)",
            lightly_run(images, b, args.steps, args.workers),
            "fp32",
            False,
            f"PIL SimSiamTransform, {args.workers} workers",
        )

    by = {r["setting"]: r["images_per_s"] for r in rows}
    ratios = {
        "ours_default_vs_lightly": by["simsiam-kit default"] / by["lightly 1.6.0 (example loop)"]
        if not args.skip_lightly
        else None,
        "ours_fp32_vs_lightly": by["simsiam-kit fp32"] / by["lightly 1.6.0 (example loop)"]
        if not args.skip_lightly
        else None,
        "ours_default_vs_ceiling": by["simsiam-kit default"] / by["ceiling (same model, random tensors)"],
        "ours_fp32_vs_ceiling_fp32": by["simsiam-kit fp32"] / by["ceiling fp32"],
    }
    print()
    print(f"ResNet-18 CIFAR stem, 32 px, batch {b}, CIFAR-10 (JPEG copy) images, median of {args.steps} steps")
    print_table(rows, ["setting", "precision", "channels_last", "median_step_s", "images_per_s", "note"])
    for k, v in ratios.items():
        if v is not None:
            print(f"{k}: {v:.2f}x")
    write_json(
        args.out,
        {
            "setting": {
                "arch": "resnet18",
                "stem": "cifar",
                "image_size": 32,
                "batch": b,
                "steps": args.steps,
                "images": args.images,
            },
            "rows": rows,
            "ratios": ratios,
            "raw_step_seconds": raw,
        },
    )


if __name__ == "__main__":
    main()
