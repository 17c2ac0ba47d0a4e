"""How the demo's kNN figures move with the CPU thread count: the README's first command (``simsiam-kit
pretrain``, the demo config) run once per thread count, everything else equal (seed, data, precision).

    python benchmarks/demo_threads.py [--threads 1 2] [--out-dir /tmp/demo-threads]

Each run is a subprocess with ``OMP_NUM_THREADS`` set (simsiam-kit then keeps it: "chosen_by OMP_NUM_THREADS");
runs go one after the other. Records per run the kNN top-1 of every monitored epoch (epoch 0 = the initial
weights), the final loss, the threads in force and the seconds, plus the CPU (model, bf16 kind) and the load
average before and after. Two runs with the same thread count on the same machine are bit-identical (checked
before this script existed); a second CPU kind (AMX vs AVX512-BF16 bf16 kernels) needs another machine: run
this script there and compare. Writes ``benchmarks/results/demo_threads.json`` (not a speed benchmark: the
seconds are those of a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _knn_by_epoch(metrics: Path) -> dict:
    if not metrics.is_file():
        return {}
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {str(r["epoch"]): r["knn_top1"] for r in recs if r.get("type") == "epoch" and "knn_top1" in r}


def run_demo(threads: int, out: Path, until_epoch: int = 0) -> dict:
    """One demo run with ``threads`` CPU threads; ``until_epoch`` > 0 stops it (SIGINT, after that epoch's kNN
    figure; the schedule stays the 8-epoch one, so the figures are the full run's)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "simsiam_kit", "pretrain", "--output", str(out), "--overwrite"]
    log = open(out.parent / f"{out.name}.log", "w")
    p = subprocess.Popen(cmd + ["--set", "train.progress=false"], env=env, cwd=REPO, stdout=log, stderr=log)
    while p.poll() is None:
        time.sleep(5)
        if until_epoch and str(until_epoch) in _knn_by_epoch(out / "metrics.jsonl"):
            p.send_signal(signal.SIGINT)
            p.wait()
    log.close()
    seconds = time.perf_counter() - t0
    text = (out.parent / f"{out.name}.log").read_text()
    start = next((line for line in text.splitlines() if "CPU thread" in line), "")
    summary_path = out / "results" / "pretrain.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {
        "threads": threads,
        "start_line": start,
        "stopped_after_epoch": until_epoch or None,
        "knn_top1_by_epoch": _knn_by_epoch(out / "metrics.jsonl"),
        "final_loss": summary.get("final_loss"),
        "wall_s": round(seconds, 1),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/demo-threads"))
    ap.add_argument("--until-epoch", type=int, default=0, help="stop each run after this epoch's kNN figure")
    a = ap.parse_args(argv)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    load_before = [round(v, 2) for v in os.getloadavg()]
    runs = [run_demo(t, a.out_dir / f"threads{t}", a.until_epoch) for t in a.threads]
    load_after = [round(v, 2) for v in os.getloadavg()]
    rows = [
        {"threads": r["threads"], **{f"epoch {e}": v for e, v in r["knn_top1_by_epoch"].items()}}
        | {"loss": r["final_loss"]}
        for r in runs
    ]
    cols = ["threads"] + [f"epoch {e}" for e in runs[0]["knn_top1_by_epoch"]] + ["loss"]
    table = print_table(rows, cols)
    spread = {
        e: round(max(r["knn_top1_by_epoch"][e] for r in runs) - min(r["knn_top1_by_epoch"][e] for r in runs), 2)
        for e in runs[0]["knn_top1_by_epoch"]
    }
    print(f"spread (max - min) of kNN top-1 per epoch, points: {spread}")
    write_json(
        "demo_threads.json",
        {
            "what": "demo pretraining (README's first command) per CPU thread count: kNN top-1 (k=200, T=0.1) by epoch",
            "load_average_before": load_before,
            "load_average_after": load_after,
            "runs": runs,
            "spread_points_by_epoch": spread,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
