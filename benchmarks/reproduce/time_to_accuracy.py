"""Time-to-accuracy at an equal wall-clock budget: simsiam-kit's CIFAR recipe vs lightly's SimSiam example.

    python benchmarks/reproduce/time_to_accuracy.py [--budget-minutes 20] [--train-images 45000]
        [--checkpoints 4] [--batch 128] [--stem cifar|imagenet] [--tools ours,lightly]

Both tools train the same backbone, ResNet-18 with the CIFAR stem (3x3 conv, no max-pool: the paper's
CIFAR backbone; ``--stem imagenet`` for torchvision's 7x7/2 stem + max-pool, the backbone of lightly's
example, ~16x cheaper at 32 px) at 32 px, on the same subset of CIFAR-10 (JPEG copy) (first
``--train-images`` of ``../shared/data/cifar10/train.npz``), with the same batch size, for the same training
wall-clock budget each, one after the other in this process.

* simsiam-kit: the pieces ``simsiam-kit pretrain`` uses (in-memory ``make_loader``, batched
  ``BatchAugment``, ``build_simsiam`` with the CIFAR recipe's heads, ``build_optimizer``, ``PretrainStep``
  with its default precision) and the recipe of ``configs/pretrain/cifar10_resnet18.yaml`` (SGD momentum
  0.9, wd 5e-4, cosine decay) with the budget changes of ``BUDGET_OVERRIDES`` (lr 0.06 x batch/256, fixed
  predictor lr; ``--ours-set`` replaces them), the cosine running over the time budget instead of a number
  of epochs (lr = lr0 * 0.5 * (1 + cos(pi * t / budget))).
* lightly 1.6.0 example: ``SimSiamTransform(input_size=32)`` in a torch ``DataLoader`` (``--workers``),
  ``SimSiamProjectionHead(512, 2048, 2048)``, ``SimSiamPredictionHead(2048, 512, 2048)``,
  ``NegativeCosineSimilarity``, ``SGD(lr=0.06)``, its fp32 loop.

kNN accuracy (k=200, T=0.1, ``simsiam_kit.retrieval.knn.knn_classify`` on l2-normalised backbone features, fp32,
bank = first ``--bank`` training images, queries = ``../shared/data/cifar10/val.npz``) is measured at random
init and after every ``budget / checkpoints`` of training time; evaluation time is not counted in the
budget. Writes ``benchmarks/results/reproduce/time_to_accuracy.json`` and ``docs/img/time_to_accuracy.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared lightly peer
from _repro import CIFAR, IMG, RESULTS, _plt, load_info, read_json, write_json

from simsiam_kit.data import load_dataset
from simsiam_kit.features import extract_features
from simsiam_kit.retrieval.knn import knn_classify
from simsiam_kit.utils.device import Precision

# The toolkit's CIFAR recipe, changed for a budget of a few hundred steps (stated in docs/reproduction.md):
# the lr of the paper's batch 512 (0.06) at batch 128, and the predictor at a fixed lr (paper Sec. 4.4,
# the official code's --fix-pred-lr).
BUDGET_OVERRIDES = ("optim.base_lr=0.06", "optim.fix_pred_lr=true")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class Evaluator:
    def __init__(self, bank_ds, query_ds, device):
        self.bank, self.queries, self.device = bank_ds, query_ds, device

    def __call__(self, backbone) -> float:
        kw = dict(
            device=self.device,
            batch_size=512,
            precision=Precision("fp32", self.device.type),
            mean=MEAN,
            std=STD,
            image_size=32,
            workers=0,
        )
        fb, lb, _ = extract_features(backbone, self.bank, **kw)
        fq, lq, _ = extract_features(backbone, self.queries, **kw)
        pred, _ = knn_classify(fb, lb, fq, k=min(200, len(fb)), temperature=0.1, num_classes=10)
        return 100.0 * (pred == lq).float().mean().item()


def budget_loop(name, step, backbone, evaluate, budget_s, checkpoints, set_lr=None, log=print):
    """Call ``step()`` until ``budget_s`` seconds of training time; evaluate kNN at each checkpoint."""
    curve = [{"train_s": 0.0, "steps": 0, "images": 0, "knn_top1": evaluate(backbone)}]
    log(f"[{name}] random init kNN {curve[0]['knn_top1']:.2f}%")
    marks = [budget_s * (i + 1) / checkpoints for i in range(checkpoints)]
    train_s, steps, images, losses = 0.0, 0, 0, []
    while marks:
        if set_lr is not None:
            set_lr(train_s / budget_s)
        t0 = time.perf_counter()
        n, loss = step()
        train_s += time.perf_counter() - t0
        steps, images = steps + 1, images + n
        losses.append(float(loss))
        if train_s >= marks[0]:
            marks.pop(0)
            acc = evaluate(backbone)
            curve.append(
                {
                    "train_s": round(train_s, 1),
                    "steps": steps,
                    "images": images,
                    "knn_top1": acc,
                    "loss": float(np.mean(losses[-10:])),
                    "load": load_info()["loadavg_1_5_15"],
                }
            )
            log(
                f"[{name}] {train_s:7.0f}s  {steps:5d} steps  {images:7d} images  "
                f"loss {curve[-1]['loss']:.3f}  kNN {acc:.2f}%  (load {curve[-1]['load']})"
            )
    return {
        "name": name,
        "curve": curve,
        "final_knn_top1": curve[-1]["knn_top1"],
        "steps": steps,
        "images": images,
        "train_s": round(train_s, 1),
        "images_per_s": images / train_s,
    }


def cycle(loader, set_epoch=True):
    epoch = 0
    while True:
        if set_epoch and hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def run_ours(
    train_ds, batch, stem, evaluate, budget_s, checkpoints, precision="auto", overrides=(), label=None, seed=0
):
    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.pretrain import build_pretraining

    cfg = load_pretrain_config(
        "cifar10_resnet18",
        [
            f"model.stem={stem}",
            f"optim.batch_size={batch}",
            f"train.precision={precision}",
            "train.device=cpu",
            f"train.seed={seed}",
            "data.val=null",
        ]
        + list(overrides),
    )
    torch.manual_seed(seed)
    p = build_pretraining(cfg, torch.device("cpu"), dataset=train_ds)  # what `simsiam-kit pretrain` runs
    p.aug_gen.manual_seed(seed)
    model, opt, init_lr, step_fn = p.model, p.optimizer, p.init_lr, p.step
    prec, cl = p.precision, p.channels_last
    it = cycle(p.data.loader)

    class T:  # the two attributes PretrainStep reads from the trainer (for its error message)
        epoch, global_step = 0, 0

    def set_lr(frac):
        lr = init_lr * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
        for g in opt.param_groups:
            g["lr"] = init_lr if g.get("fix_lr") else lr

    def step():
        model.train()
        out = step_fn(next(it), T)
        return out["images"], float(out["loss"])

    res = budget_loop(label or "simsiam-kit", step, model.backbone, evaluate, budget_s, checkpoints, set_lr)
    res.update(
        {
            "precision": prec.name,
            "channels_last": cl,
            "lr": init_lr,
            "schedule": "cosine over the budget",
            "momentum": cfg.optim.momentum,
            "weight_decay": cfg.optim.weight_decay,
            "overrides": list(overrides),
        }
    )
    return res


def run_lightly(images: np.ndarray, batch, stem, evaluate, budget_s, checkpoints, workers, seed=0):
    import torch.nn as nn
    import torchvision
    from _lightly_peer import lightly_example

    from simsiam_kit.models import build_backbone

    torch.manual_seed(seed)  # init and the DataLoader's shuffling and augmentation
    if stem == "imagenet":  # lightly's example: resnet18 children without fc
        resnet = torchvision.models.resnet18()
        backbone = nn.Sequential(*list(resnet.children())[:-1], nn.Flatten(1))
    else:
        backbone = build_backbone("resnet18", "cifar", zero_init_residual=False)
    _, dl, lightly_step = lightly_example(images, backbone, batch, workers)
    it = cycle(dl, set_epoch=False)

    def step():
        views, _ = next(it)
        return lightly_step(views)

    res = budget_loop("lightly 1.6.0 example", step, backbone, evaluate, budget_s, checkpoints)
    res.update(
        {
            "precision": "fp32",
            "lr": 0.06,
            "schedule": "constant",
            "momentum": 0.0,
            "weight_decay": 0.0,
            "workers": workers,
        }
    )
    return res


def plot(results, out: Path, title: str) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for r, c in zip(results, ["tab:blue", "tab:green", "tab:purple", "tab:orange"]):
        cur = r["curve"]
        axes[0].plot([p["train_s"] / 60 for p in cur], [p["knn_top1"] for p in cur], marker="o", c=c, label=r["name"])
        axes[1].plot([p["images"] for p in cur], [p["knn_top1"] for p in cur], marker="o", c=c, label=r["name"])
    axes[0].set(
        xlabel="training wall-clock (minutes, evaluation excluded)", ylabel="kNN top-1 (%)", title="accuracy vs time"
    )
    axes[1].set(xlabel="source images seen", ylabel="kNN top-1 (%)", title="accuracy vs images")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    print(f"wrote {out}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-minutes", type=float, default=20.0, help="training wall-clock per tool")
    ap.add_argument("--train-images", type=int, default=45000)
    ap.add_argument("--bank", type=int, default=5000, help="kNN bank: first N of the training subset")
    ap.add_argument("--queries", type=int, default=2000, help="kNN queries: first N of val.npz")
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--stem", default="cifar", choices=["imagenet", "cifar"])
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for lightly's PIL pipeline")
    ap.add_argument("--tools", default="ours,lightly")
    ap.add_argument("--seed", type=int, default=0, help="init, data order and augmentation seed of both tools")
    ap.add_argument(
        "--ours-set",
        action="append",
        default=None,
        help=f"config override for the simsiam-kit run (default: {' '.join(BUDGET_OVERRIDES)})",
    )
    ap.add_argument("--name", default="time_to_accuracy", help="file name of the JSON and PNG")
    ap.add_argument("--also", help="an earlier time_to_accuracy JSON whose curves are drawn in the same plot")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--img", default=str(IMG))
    args = ap.parse_args(argv)
    if args.ours_set is None:
        args.ours_set = list(BUDGET_OVERRIDES)

    spec = f"{CIFAR / 'train.npz'}[:{args.train_images}]"
    train_ds = load_dataset(spec, ".", False, False)
    bank = train_ds.subset(slice(0, args.bank))
    queries = load_dataset(f"{CIFAR / 'val.npz'}[:{args.queries}]", ".", False, False)
    evaluate = Evaluator(bank, queries, torch.device("cpu"))
    budget_s = args.budget_minutes * 60
    results, loads = [], {"start": load_info()}
    for tool in args.tools.split(","):
        if tool == "ours":
            label = "simsiam-kit" + (f" ({', '.join(args.ours_set)})" if args.ours_set else "")
            results.append(
                run_ours(
                    train_ds,
                    args.batch,
                    args.stem,
                    evaluate,
                    budget_s,
                    args.checkpoints,
                    overrides=args.ours_set,
                    label=label,
                    seed=args.seed,
                )
            )
        elif tool == "lightly":
            results.append(
                run_lightly(
                    train_ds.images,
                    args.batch,
                    args.stem,
                    evaluate,
                    budget_s,
                    args.checkpoints,
                    args.workers,
                    args.seed,
                )
            )
        else:
            raise SystemExit(f"--tools: unknown tool {tool!r} (ours, lightly)")
        loads[tool] = load_info()

    print(
        f"\nResNet-18 {args.stem} stem, 32 px, batch {args.batch}, CIFAR-10 (JPEG copy) [:{args.train_images}], "
        f"{args.budget_minutes:g} min training each; kNN k=200 T=0.1, bank {args.bank}, {args.queries} queries"
    )
    print(f"{'tool':<24} {'steps':>6} {'images':>8} {'img/s':>7} {'kNN init':>9} {'kNN final':>10}")
    for r in results:
        print(
            f"{r['name']:<24} {r['steps']:>6} {r['images']:>8} {r['images_per_s']:>7.1f} "
            f"{r['curve'][0]['knn_top1']:>9.2f} {r['final_knn_top1']:>10.2f}"
        )
    margin = None
    if len(results) == 2 and args.tools == "ours,lightly":
        margin = results[0]["final_knn_top1"] - results[1]["final_knn_top1"]
        print(
            f"simsiam-kit - lightly: {margin:+.2f} kNN points (target >= +5); images/s ratio "
            f"{results[0]['images_per_s'] / results[1]['images_per_s']:.2f}x"
        )
    setting = {
        "arch": "resnet18",
        "stem": args.stem,
        "image_size": 32,
        "batch": args.batch,
        "train": spec,
        "bank": args.bank,
        "queries": args.queries,
        "budget_minutes": args.budget_minutes,
        "checkpoints": args.checkpoints,
        "seed": args.seed,
        "knn": {"k": 200, "temperature": 0.1},
    }
    write_json(
        Path(args.results) / f"{args.name}.json",
        {
            "experiment": "time-to-accuracy at equal wall-clock budget",
            "setting": setting,
            "loads": loads,
            "results": results,
            "knn_margin_points": margin,
        },
    )
    shown = results
    if args.also:
        shown = read_json(Path(args.also))["results"] + results
    plot(
        shown,
        Path(args.img) / f"{args.name}.png",
        f"SimSiam kNN accuracy at equal budget: ResNet-18 {args.stem} stem 32 px, batch {args.batch}, "
        f"CIFAR-10 (JPEG copy) [:{args.train_images}], {args.budget_minutes:g} min each, 2 shared CPU cores",
    )


if __name__ == "__main__":
    main()
