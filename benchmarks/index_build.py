"""`index build` at scale: synthetic clustered vectors generated shard by shard, the index built in bounded memory,
its recall@10 against brute force and its queries/s at recall >= 0.9; autofaiss on the same vectors as the peer.

    python benchmarks/index_build.py                       # 10M x 512, --max-index-memory 4G (about 30 min on 2 cores)
    python benchmarks/index_build.py --smoke               # 10k x 16 in seconds, JSON to /tmp (proves the script runs)
    python benchmarks/index_build.py --kind opq_ivfpq --nlist 4096 --pq-m 64 --vectors 10000000

The vectors: a mixture of ``--clusters`` clusters on the unit sphere (centres drawn once; each vector a centre plus
a displacement of norm about ``--spread`` inside an ``--intrinsic``-dimensional subspace of its cluster plus
isotropic noise of ``--noise``, l2-normalised; see ``Mixture``), generated in chunks of ``--chunk`` rows from seeded
generators (not uniform noise, where nearest neighbours carry no structure and recall means nothing) and written
once as ``.npy`` shards under ``--work`` (4 x n x d bytes of disk: 20 GB for 10M x 512; a later run with the same
``--work`` and sizes reuses them): the ground truth and both builders read the same files, shard by shard, as
`index build --embeddings` reads an embedding directory. The queries are ``--queries`` further draws from the same
mixture, not in the index; their exact 10 nearest neighbours come from brute force over all vectors (a streamed
top-k, ``ExactTopK``), cached next to the vectors.

Measured, each build in its own process (peak RSS is that process's ``ru_maxrss``): build seconds, peak RSS,
index bytes on disk, the recall@10 that `index build` recorded (held-out rows of the index), and for the
external queries a sweep of the search knob (nprobe / ef): recall@10 vs brute force and queries/s (all
queries in one batch, best of 3), with the fastest setting reaching recall@10 >= 0.9.

Peer: autofaiss ``build_index`` (when installed: ``pip install autofaiss``) on the same ``.npy`` files, with the
same ``max_index_memory``; its index is
measured the same way. Targets (the issue, 2 cores): build <= 30 min, peak RSS <= 6 GB, >= 500 queries/s at
recall@10 >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import RESULTS, print_table, write_json  # noqa: E402

from simsiam_kit.retrieval.files import IVF_KINDS  # noqa: E402


class Mixture:
    """The clustered vectors: chunk i is a function of (seed, i) only.

    Each vector is a cluster centre on the unit sphere, plus a displacement inside a low-dimensional subspace of
    that cluster (``intrinsic`` directions with standard deviations falling as 1/sqrt(i + 1), their total scaled
    to ``spread``), plus a little isotropic noise (``noise``), l2-normalised: clusters with structure inside them,
    as real embeddings have. Version 2 of this mixture had isotropic noise only (norm 0.6 in 512 dims): inside a
    cluster every point was then about equally far from every other, the 10 exact neighbours of a query were a
    near-random draw from its cluster, and no compressed code could find them (10M x 512, IVF65536,PQ256x8:
    recall@10 0.658 from nprobe 8 to 65,536). The subspaces come from ``bases`` random orthonormal bases shared
    round-robin by the clusters (2 MB for 64 x 16 x 512, where one per cluster would be 330 MB at 10,000).
    """

    def __init__(
        self,
        n: int,
        dim: int,
        clusters: int,
        noise: float,
        chunk: int,
        seed: int = 0,
        intrinsic: int = 16,
        spread: float = 0.6,
        bases: int = 64,
    ):
        self.n, self.dim, self.clusters, self.noise, self.chunk, self.seed = n, dim, clusters, noise, chunk, seed
        self.intrinsic, self.spread, self.bases = min(intrinsic, dim), spread, bases
        rng = np.random.default_rng(seed)
        c = rng.standard_normal((clusters, dim)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        # (bases, intrinsic, dim): the rows of each an orthonormal set (QR of a Gaussian matrix)
        q = [np.linalg.qr(rng.standard_normal((dim, self.intrinsic)))[0].T for _ in range(bases)]
        self.basis = np.stack(q).astype(np.float32)
        sd = 1.0 / np.sqrt(np.arange(1, self.intrinsic + 1))
        self.sd = (sd * spread / np.linalg.norm(sd)).astype(np.float32)

    def draw(self, rows: int, seed) -> np.ndarray:
        rng = np.random.default_rng(seed)
        k = rng.integers(0, self.clusters, rows)
        x = self.centres[k]
        z = rng.standard_normal((rows, self.intrinsic), dtype=np.float32) * self.sd
        b = k % self.bases
        for j in range(self.bases):  # one GEMM per basis (a per-row gather of bases would be rows x 32 KB)
            m = b == j
            x[m] += z[m] @ self.basis[j]
        # float32 draws: half the time of float64 ones, and generation is most of a 10M-vector pass
        x += np.float32(self.noise / np.sqrt(self.dim)) * rng.standard_normal((rows, self.dim), dtype=np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def chunks(self):
        for i, s in enumerate(range(0, self.n, self.chunk)):
            yield self.draw(min(self.chunk, self.n - s), (self.seed, 1, i))

    def queries(self, q: int) -> np.ndarray:
        return self.draw(q, (self.seed, 2))

    def spec(self) -> dict:
        return {
            "n": self.n,
            "dim": self.dim,
            "clusters": self.clusters,
            "noise": self.noise,
            "intrinsic": self.intrinsic,
            "spread": self.spread,
            "bases": self.bases,
            "chunk": self.chunk,
            "seed": self.seed,
            "version": 3,
        }


def write_vectors(mix: Mixture, work: Path) -> tuple[Path, float]:
    """The vectors as ``.npy`` shards of ``chunk`` rows under ``work/npy`` (autofaiss's input format), generated
    once: a directory whose ``spec.json`` matches is reused. Every builder and the ground truth read these files
    (about 1 GB/s from disk here, where generating a pass of 10M x 512 takes minutes)."""
    d = work / "npy"
    spec = d / "spec.json"
    if spec.is_file() and json.loads(spec.read_text()) == mix.spec():
        return d, 0.0
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    for i, c in enumerate(mix.chunks()):
        np.save(d / f"{i:05d}.npy", c)
        if i % 10 == 9:
            print(f"{time.strftime('%H:%M:%S')} wrote {(i + 1) * mix.chunk} vectors", flush=True)
    spec.write_text(json.dumps(mix.spec()))  # last: a directory without it is regenerated
    return d, time.perf_counter() - t0


def read_chunks(d: Path):
    """The shards in order, each read whole (not memory-mapped: mapped pages would count in the reader's RSS)."""
    for f in sorted(d.glob("*.npy")):
        yield np.load(f)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _ours(args, out: str, queue) -> None:
    from simsiam_kit.retrieval.index_build import VectorSource, build_index

    src = VectorSource(lambda: read_chunks(Path(args.npy)), args.vectors, args.dim, "synthetic clustered mixture")
    t0 = time.perf_counter()
    r = build_index(
        src,
        out,
        kind=args.kind,
        max_index_memory=args.max_index_memory,
        nlist=args.nlist,
        pq_m=args.pq_m,
        sq_bits=args.sq_bits,
        on_disk=True if args.on_disk else None,
        queries=args.build_queries,
        log=lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True),  # a child's stdout is a file: flush
    )
    queue.put({"seconds": time.perf_counter() - t0, "peak_rss": peak_rss_bytes(), "meta": r.meta})


def _autofaiss_child(npy: str, out: str, max_memory: str, available: str) -> None:
    """Run in the peer's interpreter (``--peer-python``): autofaiss's build_index, then one JSON line."""
    from autofaiss import build_index as af_build

    t0 = time.perf_counter()
    af_build(
        embeddings=npy,
        index_path=str(Path(out) / "knn.index"),
        index_infos_path=str(Path(out) / "infos.json"),
        max_index_memory_usage=max_memory,
        current_memory_available=available,
        metric_type="ip",
        save_on_disk=True,
    )
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": peak_rss_bytes()}), flush=True)


def run_autofaiss(args, out: Path) -> dict:
    """autofaiss in its own process, with ``--peer-python`` (autofaiss pins numpy < 2 and its own faiss-cpu, so it
    lives in a separate environment); ``{"timed_out": s}`` past ``--peer-timeout``, ``{"skipped": why}`` when
    that interpreter has no autofaiss."""
    import subprocess

    py = args.peer_python or sys.executable
    if subprocess.run([py, "-c", "import autofaiss"], capture_output=True).returncode:
        return {"skipped": f"autofaiss is not installed for {py} (pip install autofaiss; see --peer-python)"}
    cmd = [
        py,
        str(Path(__file__).resolve()),
        "--autofaiss-child",
        args.npy,
        str(out),
        args.max_index_memory,
        args.memory_available,
    ]
    log = out / "autofaiss.log"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            p.wait(timeout=args.peer_timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            return {"timed_out": args.peer_timeout}
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"autofaiss failed (exit {p.returncode}); its log: {log}")
    return json.loads(lines[-1][len("RESULT ") :])


def _in_child(target, *a, timeout: float | None = None) -> dict:
    """Run ``target`` in a fresh process (its own peak RSS); past ``timeout`` seconds it is killed and the
    result says so (``{"timed_out": seconds}``)."""
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*a, q))
    p.start()
    try:
        res = q.get(timeout=timeout)
    except queue_mod.Empty:
        p.kill()
        p.join()
        return {"timed_out": timeout}
    p.join()
    return res


def ground_truth(args, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """The exact 10 nearest of each query over all vectors (cached next to the vectors with their spec)."""
    from simsiam_kit.retrieval.index_build import ExactTopK

    cache = Path(args.npy).parent / f"truth_{args.queries}.npy"
    if cache.is_file() and cache.stat().st_mtime > (Path(args.npy) / "spec.json").stat().st_mtime:
        return np.load(cache), 0.0
    t0 = time.perf_counter()
    t = ExactTopK(queries, 10)
    for c in read_chunks(Path(args.npy)):
        t.update(c)
    np.save(cache, t.i)
    return t.i, time.perf_counter() - t0


def sweep(index, knob: str, values, queries, truth) -> list[dict]:
    """recall@10 vs brute force and queries/s (one batch, best of 3) for each knob value."""
    rows = []
    for v in values:
        index.set_search_params(**{knob: v}) if knob else None
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            _, ids = index.search(queries, 10)
            best = min(best, time.perf_counter() - t0)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())]))
        rows.append(
            {knob or "setting": v, "recall_at_10": round(recall, 4), "queries_per_s": round(len(queries) / best)}
        )
    return rows


def _knob(kind: str, nlist: int):
    if kind == "hnsw":
        return "ef", [16, 32, 64, 128, 256, 512]
    if kind in IVF_KINDS:
        return "nprobe", [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if v <= nlist]
    return None, ["exact"]


def index_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file() and p.suffix in (".faiss", ".ivfdata", ".index"))


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--autofaiss-child":
        _autofaiss_child(*sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--noise", type=float, default=0.05, help="isotropic noise norm relative to the unit centres")
    ap.add_argument("--spread", type=float, default=0.6, help="norm of the displacement inside a cluster's subspace")
    ap.add_argument("--intrinsic", type=int, default=16, help="dimensions of each cluster's subspace")
    ap.add_argument("--chunk", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1_000)
    ap.add_argument("--build-queries", type=int, default=1_000, help="held-out rows `index build` measures on")
    ap.add_argument("--kind", default="auto")
    ap.add_argument("--nlist", type=int, default=None)
    ap.add_argument("--pq-m", type=int, default=None)
    ap.add_argument("--sq-bits", type=int, default=None)
    ap.add_argument("--on-disk", action="store_true", help="build on-disk inverted lists (default: when over budget)")
    ap.add_argument("--max-index-memory", default="4G")
    ap.add_argument("--memory-available", default="6G", help="autofaiss's current_memory_available")
    ap.add_argument("--no-autofaiss", action="store_true")
    ap.add_argument("--peer-timeout", type=float, default=3600, help="seconds autofaiss may take before it is stopped")
    ap.add_argument(
        "--prepare-only", action="store_true", help="write the vectors and the ground truth under --work, then stop"
    )
    ap.add_argument(
        "--reuse-ours", action="store_true", help="measure the index an earlier run left in --work/ours (no build)"
    )
    ap.add_argument("--peer-python", default=None, help="interpreter with autofaiss installed (default: this one)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="10k x 16, 20 clusters, IVF-PQ, 100 queries; JSON to /tmp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:  # IVF-PQ on 10k x 16 unless told otherwise
        args.vectors, args.dim, args.clusters, args.chunk, args.intrinsic = 10_000, 16, 20, 2_500, 4
        args.queries = args.build_queries = 100
        if args.kind == "auto":
            args.kind, args.nlist, args.pq_m = "ivfpq", args.nlist or 64, args.pq_m or 8
    out_json = args.out or (
        str(Path(tempfile.gettempdir()) / "index_build_smoke.json") if args.smoke else str(RESULTS / "index_build.json")
    )
    work = Path(args.work or tempfile.mkdtemp(prefix="index_build_bench_"))
    from simsiam_kit.retrieval.index import EmbeddingIndex

    load_before = [round(v, 2) for v in os.getloadavg()]
    mix = Mixture(
        args.vectors, args.dim, args.clusters, args.noise, args.chunk, intrinsic=args.intrinsic, spread=args.spread
    )
    npy, gen_seconds = write_vectors(mix, work)
    args.npy = str(npy)
    queries = mix.queries(args.queries)
    truth, gt_seconds = ground_truth(args, queries)
    print(
        f"{time.strftime('%H:%M:%S')} vectors ready ({gen_seconds:.0f} s), ground truth ({gt_seconds:.0f} s)",
        flush=True,
    )
    if args.prepare_only:
        return
    rows, results = [], {}

    ours_dir = work / "ours"
    if args.reuse_ours and (ours_dir / "index.json").is_file():  # measure the index an earlier run built
        meta = json.loads((ours_dir / "index.json").read_text())
        res = {"seconds": meta["seconds"]["total"], "peak_rss": None, "meta": meta}
    else:
        res = _in_child(_ours, args, str(ours_dir))
    index = EmbeddingIndex.load(ours_dir, use_gpu=False)
    knob, values = _knob(index.kind, index.nlist)
    table = sweep(index, knob, values, queries, truth)
    ok = [r for r in table if r["recall_at_10"] >= 0.9]
    best = max(ok, key=lambda r: r["queries_per_s"]) if ok else None
    results["simsiam_kit"] = {
        "factory": res["meta"]["factory"],
        "build_seconds": round(res["seconds"], 1),
        "peak_rss_bytes": res["peak_rss"],  # None: --reuse-ours, the build ran in an earlier invocation
        "reused_index": res["peak_rss"] is None,
        "index_bytes": index_bytes(ours_dir),
        "on_disk": res["meta"]["on_disk"],
        "build_recall_at_10": res["meta"]["recall_at_10"],
        "build_meta": res["meta"],
        "sweep": table,
        "best_at_recall_0.9": best,
    }
    rows.append(_row("simsiam-kit index build", results["simsiam_kit"]))
    if not args.no_autofaiss:  # ours' figures are on disk before the peer runs (a peer failure loses nothing)
        save(out_json, rows, results, load_before, args, gen_seconds, gt_seconds, final=False)
    del index

    if not args.no_autofaiss:
        af_dir = work / "autofaiss"
        af_dir.mkdir(parents=True, exist_ok=True)
        res = run_autofaiss(args, af_dir)
        import faiss

        if "skipped" in res:
            results["autofaiss"] = res
        elif not (af_dir / "knn.index").is_file():  # autofaiss returned without an index: its log says why
            errors = [ln for ln in (af_dir / "autofaiss.log").read_text().splitlines() if "[ERROR]" in ln]
            results["autofaiss"] = {"refused": errors[-1] if errors else "no index written", **res}
            rows.append({"builder": "autofaiss build_index: wrote no index (see its log)"})
        elif "timed_out" in res:
            results["autofaiss"] = {"timed_out_after_seconds": res["timed_out"]}
            rows.append({"builder": f"autofaiss build_index: stopped after {res['timed_out']:.0f} s"})
        else:
            idx = faiss.read_index(str(af_dir / "knn.index"))
            ivf = faiss.try_extract_index_ivf(idx)
            params = faiss.ParameterSpace()
            table = []
            name = "nprobe" if ivf is not None else "efSearch"
            for v in _knob("ivf" if ivf is not None else "hnsw", ivf.nlist if ivf is not None else 0)[1]:
                params.set_index_parameter(idx, name, v)
                r = sweep(_Raw(idx), None, [v], queries, truth)[0]
                table.append({name: r.pop("setting"), **r})
            ok = [r for r in table if r["recall_at_10"] >= 0.9]
            info = json.loads((af_dir / "infos.json").read_text()) if (af_dir / "infos.json").is_file() else {}
            results["autofaiss"] = {
                "factory": info.get("index_key"),
                "build_seconds": round(res["seconds"], 1),
                "peak_rss_bytes": res["peak_rss"],
                "index_bytes": index_bytes(af_dir),
                "infos": info,
                "sweep": table,
                "best_at_recall_0.9": max(ok, key=lambda r: r["queries_per_s"]) if ok else None,
            }
            rows.append(_row("autofaiss build_index", results["autofaiss"]))
    save(out_json, rows, results, load_before, args, gen_seconds, gt_seconds)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def save(out_json, rows, results, load_before, args, gen_seconds, gt_seconds, final: bool = True) -> None:
    text = print_table(
        rows, ["builder", "factory", "build s", "peak RSS GB", "index GB", "knob", "recall@10", "queries/s"]
    )
    write_json_to(
        out_json,
        {
            "load_before": load_before,
            "load_after": [round(v, 2) for v in os.getloadavg()],
            "complete": final,  # False: written after ours, before the peer
            "args": vars(args),
            "generate_seconds": round(gen_seconds, 1),
            "ground_truth_seconds": round(gt_seconds, 1),
            "vectors_read_from": "npy shards on local disk (written once, read by the ground truth and both builders)",
            "results": results,
            "table": text,
            "targets": {"build_seconds": 1800, "peak_rss_bytes": 6e9, "queries_per_s_at_recall_0.9": 500},
        },
    )


class _Raw:
    """A raw faiss index with the EmbeddingIndex calls `sweep` makes."""

    def __init__(self, idx):
        self.idx = idx

    def search(self, q, k):
        return self.idx.search(q, k)


def _row(name: str, r: dict) -> dict:
    b = r.get("best_at_recall_0.9") or {}
    knob = next(((k, v) for k, v in b.items() if k not in ("recall_at_10", "queries_per_s")), ("-", "-"))
    return {
        "builder": name,
        "factory": r.get("factory"),
        "build s": r["build_seconds"],
        "peak RSS GB": round(r["peak_rss_bytes"] / 1e9, 2) if r["peak_rss_bytes"] else "-",
        "index GB": round(r["index_bytes"] / 1e9, 3),
        "knob": f"{knob[0]}={knob[1]}" if b else "recall < 0.9",
        "recall@10": b.get("recall_at_10"),
        "queries/s": b.get("queries_per_s"),
    }


def write_json_to(path: str, payload: dict) -> None:
    p = Path(path)
    if p.parent == RESULTS:
        write_json(p.name, payload)
        return
    from _common import machine

    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str) + "\n")
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
