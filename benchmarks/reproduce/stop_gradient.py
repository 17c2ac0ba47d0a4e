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

from _repro import IMG, RESULTS, collapse_figure, data_overrides, load_info, plot_runs, run_variant, write_json


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
    return (data_overrides(args.train_images, args.val_images, args.train_images)
            + [f"optim.epochs={args.epochs}"] + list(args.overrides))


def main(argv=None):
    args = parse(argv)
    base = base_overrides(args)
    runs = [run_variant("baseline", args.config, base, Path(args.work)),
            run_variant("no_stop_gradient", args.config, base + ["model.stop_gradient=false"], Path(args.work))]
    s = runs[0]["setting"]
    print(f"\n{'run':<18} {'final loss':>10} {'std*sqrt(d)':>12} {'kNN top-1':>10} {'kNN init':>9} {'img/s':>7}")
    for r in runs:
        e = r["epochs"][-1]
        print(f"{r['name']:<18} {e['loss']:>10.4f} {e['std_x_sqrt_d']:>12.3f} {e['knn_top1']:>10.2f} "
              f"{r['epochs'][0]['knn_top1']:>9.2f} {e['images_per_s']:>7.1f}")
    res_dir, img_dir = Path(args.results), Path(args.img)
    write_json(res_dir / "stop_gradient.json", {"experiment": "stop-gradient ablation (paper Fig. 2)",
                                                "load_end": load_info(), "runs": runs})
    plot_runs(runs, img_dir / "stop_gradient.png",
              f"Stop-gradient ablation, CIFAR-10 (JPEG copy) [:{args.train_images}], {s['arch']} {s['stem']} stem "
              f"{s['image_size']} px, batch {s['batch']}, {args.epochs} epochs")
    collapse_figure(res_dir, img_dir / "collapse.png")


if __name__ == "__main__":
    main()
