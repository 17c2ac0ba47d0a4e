"""End-to-end ``embed`` from real JPEG files: the streaming pipeline against today's one-process loop and against
the bound for two stages sharing the same cores; peak RSS at two collection sizes.

    python benchmarks/embed_pipeline.py [--images 10000] [--rss-sizes 10000,200000] [--model FILE.onnx]
    python benchmarks/embed_pipeline.py --smoke          # seconds: proves the script runs, writes to /tmp

Inputs: real JPEG files. ``--source coco`` (default): the 102 coco128 photos of ``../shared/data`` (assorted
sizes, about 640 x 480), listed cyclically in a ``.txt`` path list up to ``--images`` rows (the list input
of ``embed``); ``--source cifar``: CIFAR-10 val images written once as JPEG files (q 90, 32 x 32).

Encoder: ``--model FILE.onnx``, else a ResNet-18 (ImageNet stem, random init, seed 0) exported with
``export_onnx`` at ``--image-size`` (224).

Measured, each on all cores, with the load average before and after (``today`` and the ``pipeline`` rows in
``--rounds`` alternating rounds, medians):

* ``today``: the loop ``embed`` ran before shards (:func:`simsiam_kit.retrieval.embed_search.embed_dataset`:
  decode one image at a time in the main process, then the encoder), images/s;
* ``decode``: the pipeline's decoding stage alone (DataLoader workers on every core: read, decode, resize,
  normalise; no encoder), images/s;
* ``encoder``: ``OnnxEmbedder.run`` alone on preprocessed batches (onnxruntime's default threads), images/s;
* ``bound``: 1 / (1/decode + 1/encoder), what two stages sharing the same cores can reach at best;
* ``pipeline``: :func:`simsiam_kit.retrieval.pipeline.embed_to_dir` with ``--workers`` (default: cores - 1)
  writing shards (``index="none"``: the finishing step is not part of the rate), images/s;
  target: >= 85 % of the bound and above ``today``;
* ``pipeline (workers chosen by embed)``: the same with ``workers=None``, what ``simsiam-kit embed`` runs by default
  (:func:`simsiam_kit.retrieval.pipeline.choose_workers` times the first images and decides);
* ``pipeline (0 workers)``: the same with decoding in the main process (``--workers 0``), when ``--workers`` is
  not 0 already: whether the decoding workers pay for themselves on this many cores;
* ``peak RSS``: the pipeline in a fresh process for each size of ``--rss-sizes`` (``wait4``'s ``ru_maxrss``,
  which includes the main process only; the decoding workers' own peaks are reported separately from
  ``RUSAGE_CHILDREN`` of that process); target: within 10 % across sizes.

Results: a table on stdout and ``benchmarks/results/embed_pipeline.json`` (``--smoke``: ``/tmp``). Run on a quiet
machine; the numbers belong in docs/benchmarks.md, not in code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, SHARED_DATA, machine, print_table  # noqa: E402

from simsiam_kit.utils.io import atomic_write_json  # noqa: E402

TARGET_OF_BOUND = 0.85
TARGET_RSS_SPREAD = 0.10

# peak RSS of one pipeline run, in a process of its own: argv = model, list, out, workers, shard size, batch
RSS_CHILD = """
import json, resource, sys
from simsiam_kit.export.embedder import OnnxEmbedder
from simsiam_kit.retrieval.pipeline import embed_to_dir
m = embed_to_dir(OnnxEmbedder(sys.argv[1], batch_size=int(sys.argv[6])), sys.argv[2], sys.argv[3],
                 index_kind="none", shard_size=int(sys.argv[5]), workers=int(sys.argv[4]))
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"images_per_s": m["images_per_s"], "count": m["count"], "workers_max_rss_kb": kids}))
"""


def load() -> list:
    return [round(v, 2) for v in os.getloadavg()]


def cores() -> int:
    return len(os.sched_getaffinity(0))


def coco_files() -> list[Path]:
    files = sorted((SHARED_DATA / "coco128_det" / "images").glob("*.jpg"))
    if not files:
        raise SystemExit(f"no coco128 photos under {SHARED_DATA / 'coco128_det' / 'images'}")
    return files


def cifar_files(tmp: Path, n: int) -> list[Path]:
    from PIL import Image

    d = tmp / "cifar_jpeg"
    d.mkdir(exist_ok=True)
    with np.load(SHARED_DATA / "cifar10" / "val.npz") as z:
        images = z["images"][: min(n, 5000)]
    out = []
    for i, a in enumerate(images):
        p = d / f"{i:05d}.jpg"
        if not p.exists():
            Image.fromarray(a).save(p, quality=90)
        out.append(p)
    return out


def path_list(files: list[Path], n: int, path: Path) -> Path:
    """``n`` rows cycling through ``files``, as the ``.txt`` list input of ``embed``."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(f"{files[i % len(files)]}\n")
    return path


def make_model(args, tmp: Path) -> Path:
    if args.model:
        return Path(args.model)
    import torch

    from simsiam_kit.engine.checkpoint import save_backbone
    from simsiam_kit.export.onnx import export_onnx
    from simsiam_kit.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone("resnet18", "imagenet", zero_init_residual=False).eval()
    size = args.image_size
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    w = tmp / "resnet18.pt"
    save_backbone(w, model, "resnet18", "imagenet", {"image_size": size, "mean": list(mean), "std": list(std)})
    out = tmp / "resnet18.onnx"
    export_onnx(str(w), out, parity_data=None, device="cpu")
    return out


def rate_today(model: Path, spec: str, batch: int) -> float:
    from simsiam_kit.data.datasets import load_dataset
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.embed_search import embed_dataset

    emb = OnnxEmbedder(model, batch_size=batch)
    ds = load_dataset(spec)
    t0 = time.perf_counter()
    z, _ = embed_dataset(emb, ds)
    return len(z) / (time.perf_counter() - t0)


def rate_decode(model: Path, spec: str, batch: int, workers: int) -> float:
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.pipeline import iter_batches, open_source, stages

    emb = OnnxEmbedder(model, batch_size=batch)
    src = open_source(spec)
    preprocess, _ = stages(emb)
    n = len(src)
    t0 = time.perf_counter()
    got = sum(b["stop"] - b["start"] for b in iter_batches(src, preprocess, [0], n, n, batch, False, workers))
    return got / (time.perf_counter() - t0)


def rate_encoder(model: Path, spec: str, batch: int, rounds: int) -> float:
    from simsiam_kit.data.datasets import load_dataset
    from simsiam_kit.export.embedder import OnnxEmbedder

    emb = OnnxEmbedder(model, batch_size=batch)
    ds = load_dataset(spec)
    x = emb.preprocess([ds.load_pil(i) for i in range(min(batch, len(ds)))])
    emb.run(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(rounds):
        emb.run(x)
    return rounds * len(x) / (time.perf_counter() - t0)


def rate_pipeline(model: Path, spec: str, batch: int, workers, shard: int, out: Path) -> float:
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.pipeline import embed_to_dir

    m = embed_to_dir(
        OnnxEmbedder(model, batch_size=batch),
        spec,
        out,
        index_kind="none",
        shard_size=shard,
        workers=workers,
        overwrite=True,  # the rounds write into the same directory
    )
    return float(m["images_per_s"])


def peak_rss(model: Path, lst: Path, out: Path, workers: int, shard: int, batch: int) -> dict:
    cmd = [sys.executable, "-c", RSS_CHILD, str(model), str(lst), str(out), str(workers), str(shard), str(batch)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    text = p.stdout.read()
    if p.returncode != 0:
        raise SystemExit(f"peak-RSS run failed (exit {p.returncode})")
    res = json.loads(text.strip().splitlines()[-1])
    return {"main_max_rss_mb": usage.ru_maxrss / 1024, "workers_max_rss_mb": res["workers_max_rss_kb"] / 1024, **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--rss-sizes", default="10000,200000")
    ap.add_argument("--source", choices=("coco", "cifar"), default="coco")
    ap.add_argument("--model", default=None)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=None, help="decoding workers (default: cores - 1)")
    ap.add_argument("--encoder-rounds", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of the end-to-end runs (medians)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 32 px model, results to /tmp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.images, args.rss_sizes, args.image_size = 48, "32,96", 32
        args.batch_size, args.shard_size, args.encoder_rounds = 8, 16, 3
    from simsiam_kit.retrieval.pipeline import default_workers

    workers = default_workers() if args.workers is None else args.workers
    out_json = (
        Path(args.out) if args.out else (Path(tempfile.gettempdir()) if args.smoke else RESULTS) / "embed_pipeline.json"
    )
    load_before = load()
    with tempfile.TemporaryDirectory(prefix="embed_pipeline_") as t:
        tmp = Path(t)
        model = make_model(args, tmp)
        files = coco_files() if args.source == "coco" else cifar_files(tmp, args.images)
        lst = path_list(files, args.images, tmp / "images.txt")
        spec = str(lst)
        decode = rate_decode(model, spec, args.batch_size, cores())
        encoder = rate_encoder(model, spec, args.batch_size, args.encoder_rounds)
        bound = 1.0 / (1.0 / decode + 1.0 / encoder)
        # the end-to-end rates, alternating round by round (the order rotating), medians
        runs = {
            "today": lambda: rate_today(model, spec, args.batch_size),
            "pipeline": lambda: rate_pipeline(model, spec, args.batch_size, workers, args.shard_size, tmp / "emb"),
            "chosen": lambda: rate_pipeline(model, spec, args.batch_size, None, args.shard_size, tmp / "embc"),
        }
        if workers:
            runs["inproc"] = lambda: rate_pipeline(model, spec, args.batch_size, 0, args.shard_size, tmp / "emb0")
        got: dict = {name: [] for name in runs}
        names = list(runs)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                got[name].append(runs[name]())
        med = {name: statistics.median(v) for name, v in got.items()}
        today, pipe, chosen, inproc = med["today"], med["pipeline"], med["chosen"], med.get("inproc")
        rss = {}
        for n in [int(v) for v in args.rss_sizes.split(",") if v]:
            rss[n] = peak_rss(
                model,
                path_list(files, n, tmp / f"rss{n}.txt"),
                tmp / f"rss{n}",
                workers,
                args.shard_size,
                args.batch_size,
            )
    load_after = load()
    rows = [
        {"stage": "today (one process)", "images_per_s": today},
        {"stage": f"decode alone ({cores()} workers)", "images_per_s": decode},
        {"stage": "encoder alone", "images_per_s": encoder},
        {"stage": "bound 1/(1/d + 1/e)", "images_per_s": bound},
        {
            "stage": f"pipeline ({workers} workers)",
            "images_per_s": pipe,
            "of_bound": pipe / bound,
            "vs_today": pipe / today,
        },
    ]
    rows.append(
        {
            "stage": "pipeline (workers chosen by embed, the default)",
            "images_per_s": chosen,
            "of_bound": chosen / bound,
            "vs_today": chosen / today,
        }
    )
    if inproc is not None:
        rows.append(
            {
                "stage": "pipeline (0 workers: decoding in-process)",
                "images_per_s": inproc,
                "of_bound": inproc / bound,
                "vs_today": inproc / today,
            }
        )
    print_table(rows, ["stage", "images_per_s", "of_bound", "vs_today"])
    rss_rows = [{"images": n, **{k: v for k, v in r.items() if k != "count"}} for n, r in rss.items()]
    if rss_rows:
        print_table(rss_rows, ["images", "main_max_rss_mb", "workers_max_rss_mb", "images_per_s"])
    mains = [r["main_max_rss_mb"] for r in rss.values()]
    spread = (max(mains) - min(mains)) / min(mains) if mains else None
    payload = {
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_after,
        "smoke": args.smoke,
        "settings": {
            "images": args.images,
            "source": args.source,
            "model": str(args.model or f"resnet18 imagenet stem, random init, {args.image_size} px"),
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
            "workers": workers,
            "cores": cores(),
        },
        "rates": {
            "today": today,
            "decode": decode,
            "encoder": encoder,
            "bound": bound,
            "pipeline": pipe,
            "pipeline_0_workers": inproc,
            "pipeline_chosen_workers": chosen,
        },
        "rounds": args.rounds,
        "per_round": got,
        "chosen_of_bound": chosen / bound,
        "chosen_vs_today": chosen / today,
        "pipeline_of_bound": pipe / bound,
        "pipeline_vs_today": pipe / today,
        "targets": {
            "of_bound": TARGET_OF_BOUND,
            "met_of_bound": pipe / bound >= TARGET_OF_BOUND,
            "met_above_today": pipe > today,
            "met_of_bound_chosen": chosen / bound >= TARGET_OF_BOUND,
            "met_above_today_chosen": chosen > today,
            "rss_spread": TARGET_RSS_SPREAD,
            "met_rss": spread is not None and spread <= TARGET_RSS_SPREAD,
        },
        "peak_rss": {str(n): r for n, r in rss.items()},
        "peak_rss_spread": spread,
    }
    atomic_write_json(out_json, payload)
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
