"""Does the bf16 fast path train like fp32? Same init, same batches, same augmentation draws.

    python benchmarks/bf16_vs_fp32.py [--steps 60] [--batch 64] [--size 32]

Runs the CIFAR recipe (ResNet-18 CIFAR stem) for ``--steps`` steps on CIFAR-10 (JPEG copy) images twice
from the same initial weights, once with bf16 autocast + channels_last (the CPU default) and once in
fp32, and compares the loss curves (per step and smoothed over 10 steps) and the output std.
Writes benchmarks/results/bf16_vs_fp32.json and docs/img/bf16_vs_fp32.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, write_json  # noqa: E402


def run(size, images, steps, batch, precision, channels_last):
    """``steps`` steps of what ``simsiam-kit pretrain`` runs (same builder), from the seed-0 initial weights."""
    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.data.datasets import ImageDataset
    from simsiam_kit.pretrain import build_pretraining

    cfg = load_pretrain_config(
        "cifar10_resnet18",
        [
            f"data.image_size={size}",
            "optim.base_lr=0.06",
            f"train.precision={precision}",
            f"train.channels_last={str(channels_last).lower()}",
            f"optim.batch_size={batch}",
            "train.device=cpu",
            "data.val=null",
        ],
    )
    torch.manual_seed(0)  # the same initial weights for both precisions
    ds = ImageDataset("bench", np.zeros(len(images), np.int64), list(range(len(images))), images=images)
    p = build_pretraining(cfg, torch.device("cpu"), dataset=ds)
    p.aug_gen.manual_seed(0)  # the same augmentations too

    class T:
        epoch, global_step = 0, 0

    losses, stds, epoch = [], [], 0
    while len(losses) < steps:
        p.data.loader.set_epoch(epoch)
        for b in p.data.loader:
            out = p.step(b, T)
            losses.append(float(out["loss"]))
            stds.append(float(out["std"]))
            if len(losses) == steps:
                break
        epoch += 1
    return losses, stds


def smooth(x, w=10):
    x = np.asarray(x)
    return np.convolve(x, np.ones(w) / w, mode="valid")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--images", type=int, default=2048)
    args = ap.parse_args()
    with np.load(SHARED_DATA / "cifar10" / "train.npz") as d:
        images = np.ascontiguousarray(d["images"][: args.images])
    l16, s16 = run(args.size, images, args.steps, args.batch, "bf16", True)
    l32, s32 = run(args.size, images, args.steps, args.batch, "fp32", False)
    d_raw = np.abs(np.array(l16) - np.array(l32))
    d_smooth = np.abs(smooth(l16) - smooth(l32))
    res = {
        "steps": args.steps,
        "batch": args.batch,
        "image_size": args.size,
        "loss_bf16": l16,
        "loss_fp32": l32,
        "std_bf16": s16,
        "std_fp32": s32,
        "max_abs_diff_loss": float(d_raw.max()),
        "median_abs_diff_loss": float(np.median(d_raw)),
        "max_abs_diff_loss_smoothed10": float(d_smooth.max()),
        "final_loss_smoothed10": {"bf16": float(smooth(l16)[-1]), "fp32": float(smooth(l32)[-1])},
    }
    print(f"steps {args.steps}, batch {args.batch}, {args.size} px")
    print(f"loss first/last  bf16 {l16[0]:.4f} / {l16[-1]:.4f}   fp32 {l32[0]:.4f} / {l32[-1]:.4f}")
    print(
        f"|bf16 - fp32| loss: median {np.median(d_raw):.4f}, max {d_raw.max():.4f}; "
        f"smoothed(10) max {d_smooth.max():.4f}"
    )
    write_json("bf16_vs_fp32.json", res)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, ax = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    ax[0].plot(l32, label="fp32", lw=1)
    ax[0].plot(l16, label="bf16 autocast + channels_last", lw=1)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss")
    ax[0].legend(fontsize=8)
    ax[1].plot(s32, label="fp32", lw=1)
    ax[1].plot(s16, label="bf16", lw=1)
    ax[1].axhline(1 / np.sqrt(2048), ls="--", c="gray", lw=1)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("output std")
    f.suptitle("SimSiam CIFAR recipe, same init and batches: bf16 vs fp32", fontsize=10)
    f.tight_layout()
    out = Path(__file__).resolve().parents[1] / "docs" / "img" / "bf16_vs_fp32.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    f.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
