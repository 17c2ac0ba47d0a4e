"""Stop-gradient ablation (SimSiam paper, Figure 2): the same config with and without the stop-gradient.

    python benchmarks/reproduce/stop_gradient.py [--epochs 4] [--train-images 3200] [--set key=value ...]

Runs ``configs/pretrain/reproduce_cpu.yaml`` (ResNet-18, CIFAR stem at 32 px, CIFAR-10 (JPEG copy)
subset; see the YAML for every setting) twice through ``simsiam_kit.pretrain.run_pretrain``: once as is
and once with ``model.stop_gradient=false``. Writes ``benchmarks/results/reproduce/stop_gradient.json``,
``docs/img/stop_gradient.png`` (loss, std of the l2-normalised projector output with the 1/sqrt(d) line,
kNN accuracy per epoch) and, when the predictor ablation's JSON exists too, ``docs/img/collapse.png``.

Expected (paper): without stop-gradient the loss goes to -1 at once, the std to 0 and kNN accuracy to
chance (10%); with it the std stays near 1/sqrt(d) and kNN accuracy rises.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _repro import IMG, RESULTS, data_overrides, report, run_variant


def parse(argv=None, description=__doc__):
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="reproduce_cpu")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-images", type=int, default=3200, help="first N of cifar10/train.npz (kNN bank too)")
    ap.add_argument("--val-images", type=int, default=1000, help="first N of cifar10/val.npz (kNN queries)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--work", default="runs/reproduce", help="where the run directories go")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--img", default=str(IMG))
    return ap.parse_args(argv)


def base_overrides(args) -> list[str]:
    return (
        data_overrides(args.train_images, args.val_images, args.train_images)
        + [f"optim.epochs={args.epochs}"]
        + list(args.overrides)
    )


def main(argv=None):
    args = parse(argv)
    base = base_overrides(args)
    runs = [
        run_variant("baseline", args.config, base, Path(args.work)),
        run_variant("no_stop_gradient", args.config, base + ["model.stop_gradient=false"], Path(args.work)),
    ]
    report(runs, args, "stop_gradient", "stop-gradient ablation (paper Fig. 2)", "Stop-gradient ablation")


if __name__ == "__main__":
    main()
