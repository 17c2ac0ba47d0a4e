"""`embed --engine ray` on this machine: the single-process pipeline against Ray Data with 1 and 2 actors, on real
JPEG files; the overhead of Ray, and the multi-machine rate projected from the measured per-actor rate.

    python benchmarks/embed_ray.py                      # coco128 photos repeated to 2,000 files, ResNet-18 @ 224
    python benchmarks/embed_ray.py --smoke              # 40 photos, a tiny conv encoder, JSON to /tmp
    python benchmarks/embed_ray.py --model encoder.onnx --images 10000 --actors 1 2 4

Input: the coco128 photos of ``shared/data`` listed ``--images`` times over in a ``.txt`` path list (real
JPEG decoding and resizing every time). Encoder: ``--model`` (an ONNX file of ``simsiam-kit export onnx``),
else a random-init ResNet-18 (ImageNet stem, 224 px) exported for the run. Each configuration embeds the
same list into a fresh directory (shards of 500, no index); images/s = images / wall seconds of the
command's library call, Ray's start-up included in ``seconds_with_startup`` and excluded from the rate (the
local runtime is started once, before the timed runs). Runs alternate (single, ray x actors, ...) for
``--reps`` rounds; figures are medians; the load average is recorded.

Overhead = 1 - (Ray images/s with as many actors as the single process has encoder + decoders) / (single-
process images/s); the issue's target is <= 15 %. Projection (on paper, not measured): a cluster of M
machines of C cores each runs about M x C / cpus_per_actor actors, so its rate is about that many times the
measured per-actor rate while the input is readable at that rate from every machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import RESULTS, SHARED_DATA, machine, print_table, write_json  # noqa: E402


def photo_list(work: Path, n: int) -> Path:
    photos = sorted((SHARED_DATA / "coco128_det" / "images").rglob("*.jpg"))
    if not photos:
        raise SystemExit(f"no coco128 photos under {SHARED_DATA / 'coco128_det' / 'images'}")
    lst = work / "photos.txt"
    lst.write_text("\n".join(str(photos[i % len(photos)]) for i in range(n)) + "\n")
    return lst


def encoder(work: Path, args) -> Path:
    if args.model:
        return Path(args.model)
    if args.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import conv_onnx_encoder

        return conv_onnx_encoder(work / "conv.onnx", size=32, dim=16)
    from simsiam_kit.export.onnx import export_onnx

    out = work / "r18.onnx"
    export_onnx("random", out, arch="resnet18", image_size=224, parity_data="demo:val[:4]")
    return out


def run_single_in_child(model: Path, data: str, out: Path, batch: int) -> float:
    """The single-process pipeline in a fresh process (its decoding workers forked there, away from this
    process's Ray threads, as a user's `embed` runs): the seconds it timed itself, start-up excluded."""
    import subprocess

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from benchmarks.embed_ray import run_once; "
        "from pathlib import Path; print(run_once(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), None, "
        "int(sys.argv[5])))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(model), data, str(out), str(batch)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(p.stdout.strip().splitlines()[-1])


def run_once(model: Path, data: str, out: Path, engine, batch: int) -> float:
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.pipeline import embed_to_dir

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    embed_to_dir(OnnxEmbedder(model, batch_size=batch), data, out, shard_size=500, index_kind="none", engine=engine)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--images", type=int, default=2_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="40 photos, a tiny conv encoder, 1 round; JSON to /tmp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.images, args.batch, args.reps = 40, 8, 1
    import ray

    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.ray_engine import RayEngine

    work = Path(tempfile.mkdtemp(prefix="embed_ray_bench_"))
    try:
        data = str(photo_list(work, args.images))
        model = encoder(work, args)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - t0
        configs = [("single process", None)] + [
            (
                f"ray, {a} actor(s)",
                RayEngine(functools.partial(OnnxEmbedder, model, batch_size=args.batch), data, actors=a),
            )
            for a in args.actors
        ]
        times: dict = {name: [] for name, _ in configs}
        for r in range(args.reps):
            for name, engine in configs[r % len(configs) :] + configs[: r % len(configs)]:
                if engine is None:
                    times[name].append(run_single_in_child(model, data, work / "out", args.batch))
                else:
                    times[name].append(run_once(model, data, work / "out", engine, args.batch))
        ray.shutdown()
        rows = []
        single = args.images / statistics.median(times["single process"])
        for name, _ in configs:
            rate = args.images / statistics.median(times[name])
            rows.append({"engine": name, "images/s": round(rate, 1), "vs single": round(rate / single, 3)})
        text = print_table(rows, ["engine", "images/s", "vs single"])
        per_actor = rows[1]["images/s"] if len(rows) > 1 else None
        payload = {
            "args": vars(args),
            "images": args.images,
            "seconds": times,
            "ray_startup_seconds": round(startup, 2),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
            "rows": rows,
            "overhead_at_max_actors": round(1 - rows[-1]["images/s"] / single, 3) if len(rows) > 1 else None,
            "per_actor_images_per_s": per_actor,
            "projection": {
                "rule": "images/s ~= machines x cores / cpus_per_actor x per-actor images/s "
                "(while the input is readable at that rate)",
                "examples": {
                    f"{m} machines x {c} cores": round(m * c * per_actor) if per_actor else None
                    for m, c in ((1, 16), (4, 16), (16, 32))
                },
            },
            "table": text,
        }
        if args.out or args.smoke:
            import json

            p = Path(args.out or Path(tempfile.gettempdir()) / "embed_ray_smoke.json")
            p.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str) + "\n")
            print(f"wrote {p}")
        else:
            write_json("embed_ray.json", payload)
        assert RESULTS  # results/ is where the non-smoke JSON goes
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
