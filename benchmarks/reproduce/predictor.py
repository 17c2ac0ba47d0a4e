"""Predictor ablation (SimSiam paper, Table 1a): the same config without the predictor (p = z).

    python benchmarks/reproduce/predictor.py [--epochs 4] [--train-images 3200] [--set key=value ...]

Runs ``configs/pretrain/reproduce_cpu.yaml`` with ``model.predictor=false`` through
``simsiam_kit.pretrain.run_pretrain``. The baseline (the same config with the predictor) is taken from
``benchmarks/results/reproduce/stop_gradient.json`` when that file was made with the same settings, and
trained here otherwise (``--train-baseline`` forces it; ``--wait-baseline SECONDS`` waits for a
stop_gradient.py started at the same time). Writes ``benchmarks/results/reproduce/predictor.json``,
``docs/img/predictor.png`` and ``docs/img/collapse.png`` (baseline, no stop-gradient, no predictor).

Expected (paper Table 1a, ImageNet): removing the predictor collapses the representation (0.1% linear
accuracy); its loss goes to -1 and the output std toward 0.
"""

from __future__ import annotations

import time
from pathlib import Path

from _repro import read_json, report, run_variant
from stop_gradient import base_overrides, parse


def main(argv=None):
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    train_baseline = "--train-baseline" in argv
    if train_baseline:
        argv.remove("--train-baseline")
    wait = 0.0
    if "--wait-baseline" in argv:  # seconds to wait for stop_gradient.py running at the same time
        i = argv.index("--wait-baseline")
        wait = float(argv[i + 1])
        del argv[i : i + 2]
    args = parse(argv, __doc__)
    base = base_overrides(args)
    res_dir = Path(args.results)
    runs = [run_variant("no_predictor", args.config, base + ["model.predictor=false"], Path(args.work))]
    baseline, t_end = None, time.time() + wait
    while not train_baseline:
        sg = read_json(res_dir / "stop_gradient.json")
        cand = next((r for r in sg["runs"] if r["name"] == "baseline"), None) if sg else None
        if cand is not None and cand["overrides"] == base and cand["config"] == args.config:
            baseline = cand
            print("baseline: reusing the stop-gradient ablation's baseline run (same config and overrides)")
            break
        if time.time() >= t_end:
            break
        time.sleep(10)
    if baseline is None:
        baseline = run_variant("baseline", args.config, base, Path(args.work))
    runs = [baseline] + runs
    report(runs, args, "predictor", "predictor ablation (paper Table 1a)", "Predictor ablation")


if __name__ == "__main__":
    main()
