"""The paper's full CIFAR-10 recipe on one GPU (appendix D: ResNet-18 CIFAR stem, batch 512, 800 epochs).

    python benchmarks/reproduce/gpu_full_recipe.py [--epochs 800] [--minutes 0] [--output runs/cifar10_full]
        [--resume] [--set key=value ...]

Runs ``configs/pretrain/cifar10_resnet18.yaml`` through ``simsiam_kit.pretrain.run_pretrain`` on
``../shared/data/cifar10/train.npz`` (45k images; kNN bank) with ``../shared/data/cifar10/val.npz`` (5k)
as kNN queries, kNN (k=200, T=0.1) every ``--knn-every`` epochs, checkpoint every epoch (so ``--resume``
continues a stopped run). ``--minutes N`` caps the run for a quick measurement: the number of epochs is
cut to what fits after timing one epoch (the cosine schedule then spans those epochs; accuracy is only comparable
to the paper for a full run). Reports images/s, seconds per epoch and kNN accuracy per epoch as a table,
``benchmarks/results/reproduce/gpu_full_recipe.json`` and ``docs/img/gpu_full_recipe.png``.

Paper: 91.8% linear accuracy after 800 epochs (the kNN monitor reads a few points lower than linear).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _repro import CIFAR, IMG, RESULTS, _plt, load_info, write_json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=800)
    ap.add_argument("--minutes", type=float, default=0.0, help="cap the run to about this long (0 = no cap)")
    ap.add_argument("--knn-every", type=int, default=1)
    ap.add_argument("--output", default="runs/cifar10_full")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--img", default=str(IMG))
    args = ap.parse_args(argv)

    import torch

    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.engine.hooks import read_metrics
    from simsiam_kit.pretrain import run_pretrain

    if not torch.cuda.is_available():
        print("warning: no CUDA device; this script is meant for one GPU (it will run, very slowly, on CPU)")
    base = [
        f"data.train={CIFAR / 'train.npz'}",
        f"data.val={CIFAR / 'val.npz'}",
        f"train.knn_every={args.knn_every}",
        "train.checkpoint_every=1",
        "train.log_every=20",
    ]
    epochs = args.epochs
    out = Path(args.output)
    t0 = time.time()
    if args.minutes > 0 and not args.resume:
        # time one epoch, then resume the same run directory with the epochs that fit. The recipe sets the
        # cosine lr once per epoch, so epoch 1 (lr = lr0) is the same whatever the final epoch count.
        first = load_pretrain_config("cifar10_resnet18", base + ["optim.epochs=1"] + args.overrides)
        run_pretrain(first, output=out)
        epoch_s = time.time() - t0
        epochs = max(2, min(args.epochs, int(args.minutes * 60 / max(epoch_s, 1e-6))))
        print(f"one epoch took {epoch_s:.0f}s (incl. start-up and kNN); training {epochs} epochs in total")
        cfg = load_pretrain_config("cifar10_resnet18", base + [f"optim.epochs={epochs}"] + args.overrides)
        summary = run_pretrain(cfg, output=out, resume=True)
    else:
        cfg = load_pretrain_config("cifar10_resnet18", base + [f"optim.epochs={epochs}"] + args.overrides)
        summary = run_pretrain(cfg, output=out, resume=args.resume)

    recs = [r for r in read_metrics(out / "metrics.jsonl") if r.get("type") == "epoch"]
    rows, prev_t = [], 0.0
    for r in recs:
        t = r.get("time_s") or 0.0
        # time_s counts from each (re)start of the writer; an epoch's time is the difference within a segment
        ep_s = t - prev_t if t >= prev_t else t
        prev_t = t
        rows.append(
            {
                "epoch": r["epoch"],
                "images_per_s": r.get("images_per_s"),
                "epoch_s": round(ep_s, 1),
                "loss": r.get("loss"),
                "std_x_sqrt_d": r.get("std_x_sqrt_d"),
                "knn_top1": r.get("knn_top1"),
            }
        )
    print(f"\n{'epoch':>5} {'img/s':>8} {'epoch s':>8} {'loss':>8} {'std*sqrt(d)':>11} {'kNN':>6}")
    for r in rows:
        knn = f"{r['knn_top1']:.2f}" if r["knn_top1"] is not None else "-"
        print(
            f"{r['epoch']:>5} {r['images_per_s'] or 0:>8.0f} {r['epoch_s']:>8.1f} {r['loss'] or 0:>8.4f} "
            f"{r['std_x_sqrt_d'] or 0:>11.3f} {knn:>6}"
        )
    write_json(
        Path(args.results) / "gpu_full_recipe.json",
        {
            "experiment": "full CIFAR-10 recipe (paper appendix D)",
            "epochs_planned": epochs,
            "wall_s": round(time.time() - t0, 1),
            "load_end": load_info(),
            "summary": summary,
            "epochs": rows,
            "paper": {"linear_top1": 91.8, "epochs": 800},
        },
    )
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    kn = [r for r in rows if r["knn_top1"] is not None]
    axes[0].plot([r["epoch"] for r in kn], [r["knn_top1"] for r in kn], marker="o", ms=2)
    axes[0].set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN accuracy (k=200, T=0.1) on val.npz")
    axes[1].plot([r["epoch"] for r in rows], [r["images_per_s"] for r in rows], marker="o", ms=2)
    axes[1].set(xlabel="epoch", ylabel="images/s", title="training throughput")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"SimSiam CIFAR-10 (JPEG copy) recipe, ResNet-18 CIFAR stem, batch 512, {epochs} epochs, "
        f"{summary.get('device', '?')}",
        fontsize=9,
    )
    fig.tight_layout()
    Path(args.img).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(args.img) / "gpu_full_recipe.png")
    print(f"wrote {Path(args.img) / 'gpu_full_recipe.png'}")


if __name__ == "__main__":
    main()
