"""Load on ``simsiam-kit serve`` over loopback: p50/p99 latency and requests/s with and without dynamic
batching, next to the same searches through the library in one process (the floor).

    python benchmarks/serve_load.py [--clients 8] [--requests 200] [--images 5000] [--out FILE.json]
    python benchmarks/serve_load.py --threads 1 --out benchmarks/results/serve_load_threads1.json
    python benchmarks/serve_load.py --smoke --out /tmp/serve_load.json   # seconds: 2 clients x 5, 200 images

Setup: a ResNet-18 (CIFAR stem, random init: the encoder's cost does not depend on its weights) exported to
ONNX at 32 px with ``export_onnx`` and embedded over ``--images`` CIFAR-10 val images (flat FAISS index),
``--model``/``--index`` to use your own. Queries: CIFAR-10 val images encoded as PNG bytes (decoding is part of
every path), each client cycling through its own.

Modes (each a fresh server process started with ``simsiam-kit serve`` on a free 127.0.0.1 port, one warm-up
search per client not timed):

* ``library_one``: one process, no HTTP: ``open_image`` + ``OnnxEmbedder.embed([img])`` + ``Gallery.search``
  per query, one at a time (what ``simsiam-kit search`` runs per image, the model and index loaded once);
* ``serve_batching``: ``--clients`` concurrent clients (threads, keep-alive connections), ``--requests`` each,
  ``POST /search?k=10``; dynamic batching on (``--batch-wait-ms 5``);
* ``serve_direct``: the same with ``--no-batching`` (one encoder call per request).

Recorded: p50/p99 latency (ms), requests/s (all requests / wall time), the mean batch (requests / encoder
calls, from ``/healthz``), and the 1-minute load average before and after each mode (run it on a quiet
machine: other processes' load moves every figure). Traffic goes to 127.0.0.1 only, bounded by count.
Run it with the default threads and with ``--threads 1``: whether batching pays depends on how much of the
machine one encoder call already uses; ``simsiam-kit serve`` keeps batching off by default until it does.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import SHARED_DATA, machine, print_table  # noqa: E402

CIFAR_VAL = SHARED_DATA / "cifar10" / "val.npz"
BOUNDARY = "servebenchboundary"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _body(data: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n'
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def build(workdir: Path, images: int, log) -> tuple[Path, Path]:
    """Export the encoder and embed ``images`` CIFAR-10 val images; returns (model, index dir)."""
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.export.onnx import export_onnx
    from simsiam_kit.retrieval.embed_search import embed_dataset_to_dir

    model = workdir / "resnet18_cifar.onnx"
    export_onnx("random", model, arch="resnet18", stem="cifar", image_size=32, parity_data=None)
    index = workdir / "emb"
    embed_dataset_to_dir(OnnxEmbedder(model), f"{CIFAR_VAL}[:{images}]", index)
    log(f"built {model.name} and an index of {images} CIFAR-10 val images in {workdir}")
    return model, index


def library_one(model: Path, index: Path, queries: list[bytes], k: int, threads=None) -> dict:
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.gallery import Gallery, open_image

    g, emb = Gallery.open(index), OnnxEmbedder(model, threads=threads)
    lat = []
    g.search(emb.embed([open_image(io.BytesIO(queries[0]))]), k)  # warm-up
    t0 = time.perf_counter()
    for q in queries:
        s = time.perf_counter()
        g.search(emb.embed([open_image(io.BytesIO(q))]), k)
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    return _summary(lat, wall, calls=len(queries))


def _summary(lat: list, wall: float, calls: int) -> dict:
    ms = sorted(x * 1000 for x in lat)
    return {
        "requests": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
        "req_per_s": round(len(ms) / wall, 1),
        "mean_batch": round(len(ms) / max(calls, 1), 2),
    }


def _get(port: int, path: str) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path)
        return json.loads(c.getresponse().read())
    finally:
        c.close()


def serve_mode(model: Path, index: Path, queries: list[list[bytes]], k: int, batching: bool, threads=None) -> dict:
    port = _free_port()
    args = [sys.executable, "-m", "simsiam_kit", "serve", "--index", str(index), "--model", str(model)]
    args += ["--port", str(port), "--batching" if batching else "--no-batching", "--max-k", str(max(k, 10))]
    args += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _get(port, "/healthz")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not start: {proc.stderr.read().decode()[-1500:]}") from None
                time.sleep(0.2)
        lat, errors = [], []
        lock = threading.Lock()
        warm, start = threading.Barrier(len(queries) + 1), threading.Barrier(len(queries) + 1)

        def client(mine: list[bytes]):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
            bodies = [_body(q) for q in mine]
            conn.request("POST", f"/search?k={k}", bodies[0], headers)  # warm-up, not timed
            conn.getresponse().read()
            warm.wait()
            start.wait()
            for b in bodies:
                s = time.perf_counter()
                conn.request("POST", f"/search?k={k}", b, headers)
                r = conn.getresponse()
                r.read()
                t = time.perf_counter() - s
                with lock:
                    (lat if r.status == 200 else errors).append(t if r.status == 200 else r.status)
            conn.close()

        threads = [threading.Thread(target=client, args=(q,)) for q in queries]
        for t in threads:
            t.start()
        warm.wait()  # every client warmed up: count the encoder calls from here
        calls0 = _get(port, "/healthz")["encoder_calls"]
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - t0
        calls = _get(port, "/healthz")["encoder_calls"] - calls0
        if errors:
            raise RuntimeError(f"{len(errors)} searches failed: statuses {sorted(set(errors))}")
        return _summary(lat, wall, calls)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200, help="searches per client")
    ap.add_argument("--images", type=int, default=5000, help="CIFAR-10 val images in the index")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--model", type=Path, default=None, help="an exported encoder (with --index)")
    ap.add_argument("--index", type=Path, default=None, help="a directory written by `simsiam-kit embed`")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    ap.add_argument("--smoke", action="store_true", help="seconds: 2 clients x 5 searches, 200 images")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    a = ap.parse_args()
    if a.smoke:
        a.clients, a.requests, a.images = 2, 5, 200
    if (a.model is None) != (a.index is None):
        ap.error("--model and --index go together")
    if not 1 <= a.clients <= 64 or not 1 <= a.requests <= 10_000:
        ap.error("--clients in 1..64 and --requests in 1..10000 (the load stays bounded)")
    log = print
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        model, index = (a.model, a.index) if a.model else build(Path(tmp), a.images, log)
        with np.load(CIFAR_VAL) as d:
            imgs = d["images"][: a.clients * a.requests]
        pngs = [_png(x) for x in imgs]
        per_client = [[pngs[(c * a.requests + i) % len(pngs)] for i in range(a.requests)] for c in range(a.clients)]
        rows, modes = [], {}
        for name, run in (
            ("library_one", lambda: library_one(model, index, pngs[: a.clients * a.requests], a.k, a.threads)),
            ("serve_batching", lambda: serve_mode(model, index, per_client, a.k, True, a.threads)),
            ("serve_direct", lambda: serve_mode(model, index, per_client, a.k, False, a.threads)),
        ):
            load0 = os.getloadavg()[0]
            res = run()
            res.update(load_before=round(load0, 2), load_after=round(os.getloadavg()[0], 2))
            res["clients"] = 1 if name == "library_one" else a.clients
            modes[name] = res
            rows.append({"mode": name, **res})
            log(f"{name}: {res}")
    print_table(rows, ["mode", "clients", "requests", "p50_ms", "p99_ms", "req_per_s", "mean_batch", "load_before"])
    payload = {
        "benchmark": "serve_load",
        "machine": machine(),
        "settings": {
            "clients": a.clients,
            "requests_per_client": a.requests,
            "index_images": a.images if a.model is None else None,
            "k": a.k,
            "model": "resnet18 cifar stem, random init, 32 px" if a.model is None else str(a.model),
            "batch_wait_ms": 5.0,
            "onnxruntime_threads": a.threads or "all cores",
            "smoke": a.smoke,
        },
        "modes": modes,
        "batching_speedup_req_per_s": round(
            modes["serve_batching"]["req_per_s"] / modes["serve_direct"]["req_per_s"], 3
        ),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
