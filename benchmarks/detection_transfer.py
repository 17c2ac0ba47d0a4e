"""Detection transfer on coco128 (82 train / 20 val images): SimSiam backbone vs random init.

1. Pretrain SimSiam (ResNet-18, ImageNet stem, needed for detection) with this toolkit on the 82
   coco128 *train* images (no labels used), at low resolution, for a few epochs (or reuse ``--pretrained``).
2. Fine-tune the torchvision engine (Faster R-CNN R18-FPN, BN in train mode, all stages trainable)
   for the same fixed number of iterations from (a) that backbone and (b) a random init, same seed.
3. Evaluate both on the 20 val images with pycocotools; print AP / AP50 and seconds per iteration,
   with ratios SimSiam / random, and write ``benchmarks/results/detection_transfer.json``.

Run from the repository root::

    python benchmarks/detection_transfer.py                       # ~10 min on 2 CPU cores
    python benchmarks/detection_transfer.py --iters 2000 --min-size 512 --device cuda   # a real run

It is a smoke-scale comparison: 82 images and a few hundred iterations give AP near zero; the point is
that the pipeline runs end to end on real data and the two inits are compared under identical settings.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
DATA = REPO.parent / "shared" / "data" / "coco128_det"

from _common import cpu_record  # noqa: E402  (benchmarks/ is on the path of a script run from it)


def pretrain(out: Path, epochs: int, image_size: int, batch_size: int, device: str) -> Path:
    """SimSiam on the coco128 train images (an ImageFolder of symlinks, one dummy class)."""
    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.pretrain import run_pretrain

    train = json.loads((DATA / "instances_train.json").read_text())
    folder = out / "coco128_train_images" / "all"
    folder.mkdir(parents=True, exist_ok=True)
    for im in train["images"]:
        link = folder / im["file_name"]
        if not link.exists():
            link.symlink_to(DATA / "images" / im["file_name"])
    cfg = load_pretrain_config(
        "demo",
        [
            f"data.train={folder.parent}",
            "data.val=null",
            f"data.image_size={image_size}",
            "data.blur_prob=0.5",
            "data.mean=[0.485,0.456,0.406]",
            "data.std=[0.229,0.224,0.225]",
            "data.workers=2",
            "model.arch=resnet18",
            "model.stem=imagenet",
            "model.proj_layers=2",
            "model.proj_dim=512",
            "model.proj_hidden=512",
            "model.pred_hidden=128",
            f"optim.epochs={epochs}",
            f"optim.batch_size={batch_size}",
            "optim.base_lr=0.05",
            "optim.lr_per_step=true",
            "optim.warmup_epochs=1",
            "train.knn_every=0",
            "train.progress=false",
            "train.plots=false",
            "train.precision=fp32",
            f"train.device={device}",
            "name=coco128_simsiam",
        ],
    )
    run_dir = out / "pretrain"
    summary = run_pretrain(cfg, run_dir, log=lambda s: print("  " + s))
    print(
        f"  pretrain: {summary['train_seconds']} s, final loss {summary['final_loss']:.4f}, "
        f"std x sqrt(d) {summary['std_x_sqrt_d']:.3f}"
    )
    return run_dir


def finetune(weights: str, out: Path, args) -> dict:
    from simsiam_kit.evaluation.detection.data import resolve_data
    from simsiam_kit.evaluation.detection.torchvision_engine import load_detection_config, run_torchvision_detection

    data = resolve_data(
        DATA / "instances_train.json", DATA / "images", DATA / "instances_val.json", DATA / "images", None, "", ""
    )
    cfg = load_detection_config(
        "torchvision_quick",
        [
            "model.norm=bn",
            "model.trainable_layers=5",
            f"model.min_size={args.min_size}",
            f"model.max_size={int(args.min_size * 1.5)}",
            "model.rpn_post_nms_top_n_train=300",
            "model.rpn_post_nms_top_n_test=100",
            "model.box_batch_size_per_image=128",
            f"solver.batch_size={args.batch_size}",
            f"solver.base_lr={args.lr}",
            "solver.warmup_iters=20",
            f"train.device={args.device}",
            "train.progress=false",
            "train.log_every=10",
            "data.workers=2",
            "test.vis_images=4",
        ],
    )
    return run_torchvision_detection(
        cfg, weights, data, out, iters=args.iters, arch="resnet18", log=lambda s: print("  " + s)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30, help="fine-tuning iterations for each init")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.08, help="solver.base_lr at batch 16 (scaled to --batch-size)")
    ap.add_argument("--min-size", type=int, default=160)
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--pretrain-size", type=int, default=64)
    ap.add_argument("--pretrain-batch", type=int, default=32)
    ap.add_argument("--pretrained", default=None, help="reuse a pretraining run / backbone.pt instead of pretraining")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "detection_transfer.json"))
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"coco128_det not found at {DATA}")
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="det_transfer_"))
    t0 = time.time()
    if args.pretrained:
        weights, pre_s = args.pretrained, None
    else:
        print(
            f"[1/3] SimSiam pretraining on the 82 coco128 train images ({args.pretrain_epochs} epochs, "
            f"{args.pretrain_size} px)"
        )
        t = time.time()
        weights = str(pretrain(work, args.pretrain_epochs, args.pretrain_size, args.pretrain_batch, args.device))
        pre_s = round(time.time() - t, 1)
    rows = {}
    for i, (label, w) in enumerate((("simsiam", weights), ("random", "random"))):
        print(f"[{i + 2}/3] fine-tune Faster R-CNN R18-FPN from {label} ({args.iters} iterations)")
        rows[label] = finetune(w, work / f"det_{label}", args)
    s, r = rows["simsiam"], rows["random"]

    def ratio(a, b):
        return round(a / b, 3) if b else None

    result = {
        "benchmark": "detection_transfer",
        "data": "coco128_det (82 train / 20 val)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "pretrain_seconds": pre_s,
        "total_seconds": round(time.time() - t0, 1),
        "machine": {
            **cpu_record(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
        },
        "runs": {
            k: {
                m: v[m]
                for m in (
                    "AP",
                    "AP50",
                    "AP75",
                    "APs",
                    "APm",
                    "APl",
                    "seconds_per_iter",
                    "train_seconds",
                    "eval_seconds",
                    "num_detections",
                    "final_loss",
                )
            }
            for k, v in rows.items()
        },
        "ratio_simsiam_over_random": {
            "AP": ratio(s["AP"], r["AP"]),
            "AP50": ratio(s["AP50"], r["AP50"]),
            "seconds_per_iter": ratio(s["seconds_per_iter"], r["seconds_per_iter"]),
        },
        "work_dir": str(work),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print()
    print("| init | AP (%) | AP50 (%) | AP75 (%) | s/iter (median) | final loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k, v in rows.items():
        print(
            f"| {k} | {v['AP']:.4f} | {v['AP50']:.4f} | {v['AP75']:.4f} | {v['seconds_per_iter']:.3f} | "
            f"{v['final_loss']:.3f} |"
        )
    q = result["ratio_simsiam_over_random"]
    print(f"ratio simsiam / random: AP {q['AP']}, AP50 {q['AP50']}, s/iter {q['seconds_per_iter']}")
    print(f"results: {args.out}  (work dir {work}, total {result['total_seconds']} s)")


if __name__ == "__main__":
    main()
