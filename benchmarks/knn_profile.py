"""The approximate kNN (``--index bf16``) against its floor, the bare bf16 GEMM: the time above the GEMM as a
fraction of the GEMM, per chunk size and rerank, with the recall of the exact neighbours.

    python benchmarks/knn_profile.py [--features cifar|synthetic] [--backbone RUN/backbone.pt] [--reps 5]
                                     [--chunks 256,512,1024] [--reranks 16,32] [--torch-profile]
                                     [--baseline GIT_REV] [--out FILE]
    python benchmarks/knn_profile.py --smoke     # seconds: synthetic 3,000 x 64 bank, writes /tmp

Bank and queries as ``benchmarks/knn_eval.py`` (default: CIFAR-10 features of a random-init ResNet-18, 45,000 x 512
bank, 5,000 queries, cached; ``--backbone`` a trained one, the setting the target is stated on), k=200. Rows,
timed in alternation (every row once per round, the order rotating), one untimed warm-up each, medians:

* ``gemm_bf16/chunk C``: the floor, ``queries[c] (bf16) @ bank_c16.T`` per chunk of C queries into one reused
  output buffer, exactly the product the search computes, nothing else;
* ``gemm+select/chunk C``: the GEMM and the selection of the k + rerank candidates (two-stage, ``select_topk``),
  ``gemm+topk/chunk C``: the same with a plain ``torch.topk`` over every column (the selection before issue 25);
* ``search/chunk C/rerank R``: ``knn_search_bf16`` itself (GEMM, selection, fp32 re-scoring of the band,
  ordering), what ``eval knn --index bf16`` runs after building the index;
* where numba is installed (the ``cpu`` extra), the selection and the search run in its compiled kernels
  (:mod:`simsiam_kit.retrieval.select_kernels`), and ``gemm+select torch form/chunk C`` and
  ``torch-form search/chunk C/rerank R`` time the torch forms of the same steps (``compiled=False``, what runs
  without numba) in the same alternation.

* ``baseline search/chunk C/rerank R`` (with ``--baseline REV``): ``knn_search_bf16`` as it was at git revision
  REV (``simsiam_kit/retrieval/index.py`` read with ``git show``), timed in the same alternation: before and
  after a change in one run, so load from other processes hits both alike. Each search row then records
  whether its results are identical to the baseline's (``identical_to_baseline``).

Reported per search row: ``overhead_vs_gemm = (search - gemm) / gemm`` at the same chunk size (target <= 0.5, the
issue's), the recall@k of the exact neighbours and the share of rows identical to the exact search.
``--torch-profile`` adds torch's profiler table (operators by self CPU time) of one search call at the first
chunk size and rerank.

Every JSON names its CPU (model and the avx512_bf16 / amx_bf16 / amx_int8 / avx512_vnni flags); the target is
to be checked on both CPU kinds (AMD EPYC with AVX512-BF16, Intel Xeon with AMX).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

from _common import cpu_record  # noqa: E402

from simsiam_kit.retrieval.index import EmbeddingIndex, kernels, knn_search_bf16, select_topk  # noqa: E402
from simsiam_kit.utils.io import atomic_write_json  # noqa: E402

TARGET_OVERHEAD = 0.5  # the issue: the time above the bare bf16 GEMM at most 50 % of the GEMM


def synthetic(n: int, q: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, d, generator=g)
    lb, lq = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (q,), generator=g)
    fb = torch.nn.functional.normalize(centres[lb] * 0.15 + torch.randn(n, d, generator=g) / d**0.5, dim=1)
    fq = torch.nn.functional.normalize(centres[lq] * 0.15 + torch.randn(q, d, generator=g) / d**0.5, dim=1)
    return fb, fq


def alternate(fns: dict, reps: int) -> dict:
    names = list(fns)
    for n in names:
        fns[n]()
    times = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}


def baseline_module(rev: str):
    """``simsiam_kit/retrieval/index.py`` at git revision ``rev``, as a module of its own."""
    import subprocess
    import types

    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:simsiam_kit/retrieval/index.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mod = types.ModuleType(f"index_at_{rev}")
    exec(compile(src, f"{rev}:simsiam_kit/retrieval/index.py", "exec"), mod.__dict__)
    return mod


def profile(bank, c16, mean, fq, k, rerank, chunk) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        knn_search_bf16(bank, c16, mean, fq, k, rerank, chunk=chunk)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", choices=("cifar", "synthetic"), default="cifar")
    ap.add_argument("--backbone", default="random", help="with --features cifar: a trained backbone file")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--chunks", default="256,512,1024", help="queries per GEMM, comma-separated")
    ap.add_argument("--reranks", default="16,32", help="--rerank values, comma-separated")
    ap.add_argument("--torch-profile", action="store_true", help="torch's operator table of one search call")
    ap.add_argument("--baseline", default=None, help="git revision whose knn_search_bf16 is timed alongside")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on a small synthetic bank; writes /tmp")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        a.features, a.reps, a.k, a.chunks, a.reranks, a.torch_profile = "synthetic", 1, 20, "64,128", "4", True
    out = a.out or (
        Path("/tmp/knn_profile_smoke.json") if a.smoke else ROOT / "benchmarks" / "results" / "knn_profile.json"
    )
    chunks = [int(c) for c in a.chunks.split(",") if c.strip()]
    reranks = [int(r) for r in a.reranks.split(",") if r.strip()]

    before = cpu_record()
    if a.features == "cifar":
        from knn_eval import cifar_features  # the same cached features as knn_eval.py

        fb, _, fq, _, _ = cifar_features(a.backbone)
    else:
        fb, fq = synthetic(3000, 200, 64) if a.smoke else synthetic(45000, 5000, 512)
    k = min(a.k, len(fb))
    mean = fb.mean(0)
    c16 = (fb - mean).to(torch.bfloat16)
    bank_t = c16.t()
    print(f"bank {tuple(fb.shape)}, queries {tuple(fq.shape)}, k={k}, {torch.get_num_threads()} threads, "
          f"{before['cpu']} ({before['cpu_kind']}), load {before['load_average']}")  # fmt: skip

    def gemm(chunk, then=None):
        buf = torch.empty((min(chunk, len(fq)), len(fb)), dtype=torch.bfloat16)

        def run():
            for s in range(0, len(fq), chunk):
                q = fq[s : s + chunk]
                sim = torch.matmul(q.to(torch.bfloat16), bank_t, out=buf[: len(q)])
                if then is not None:
                    then(sim)

        return run

    base = baseline_module(a.baseline) if a.baseline else None
    compiled = kernels() is not None  # the numba kernels: their rows and the torch forms' rows, in one alternation
    fns: dict = {}
    searches: dict = {}
    for c in chunks:
        fns[f"gemm_bf16/chunk {c}"] = gemm(c)
        kc = min(len(fb), k + max(reranks))
        fns[f"gemm+select/chunk {c}"] = gemm(c, lambda sim, kc=kc: select_topk(sim, kc))
        if compiled:
            fns[f"gemm+select torch form/chunk {c}"] = gemm(c, lambda sim, kc=kc: select_topk(sim, kc, compiled=False))
        fns[f"gemm+topk/chunk {c}"] = gemm(c, lambda sim, kc=kc: torch.topk(sim, kc, dim=1))
        for r in reranks:
            searches[f"search/chunk {c}/rerank {r}"] = lambda c=c, r=r: knn_search_bf16(
                fb, c16, mean, fq, k, r, chunk=c
            )
            if compiled:
                searches[f"torch-form search/chunk {c}/rerank {r}"] = lambda c=c, r=r: knn_search_bf16(
                    fb, c16, mean, fq, k, r, chunk=c, compiled=False
                )
            if base is not None:
                searches[f"baseline search/chunk {c}/rerank {r}"] = lambda c=c, r=r: base.knn_search_bf16(
                    fb, c16, mean, fq, k, r, chunk=c
                )
    fns.update(searches)
    med = alternate(fns, a.reps)

    _, exact = EmbeddingIndex(fb.shape[1], "flat", "torch").add(fb).search(fq, k)
    rows = []
    print(f"\n{'row':48s} {'median s':>9s} {'above GEMM':>11s} {'recall@k':>9s} {'rows = exact':>12s}")
    for name, sec in med.items():
        c = int(name.split("chunk ")[1].split("/")[0])
        g = med[f"gemm_bf16/chunk {c}"]
        row = {"row": name, "chunk": c, "median_s": sec, "overhead_vs_gemm": (sec - g) / g}
        if name in searches:
            r = int(name.split("rerank ")[1])
            sims, ids = searches[name]()
            hit = (ids.unsqueeze(2) == exact.unsqueeze(1)).any(2).float().mean(1)
            row.update(
                rerank=r,
                recall_at_k=float(hit.mean()),
                min_recall_at_k=float(hit.min()),
                rows_identical_to_exact=float((ids == exact).all(1).float().mean()),
                meets_overhead_target=(sec - g) / g <= TARGET_OVERHEAD,
            )
            if base is not None and not name.startswith("baseline"):
                bs, bi = searches[f"baseline search/chunk {c}/rerank {r}"]()
                row["identical_to_baseline"] = bool(torch.equal(bs, sims) and torch.equal(bi, ids))
        rows.append(row)
        extra = f" {row['recall_at_k']:9.4f} {row['rows_identical_to_exact']:12.3f}" if "recall_at_k" in row else ""
        print(f"{name:48s} {sec:9.4f} {100 * row['overhead_vs_gemm']:10.1f}%{extra}")
    result = {
        "benchmark": "knn_profile",
        "features": a.features if a.features == "synthetic" else f"cifar ({a.backbone})",
        "bank": list(fb.shape),
        "queries": list(fq.shape),
        "k": k,
        "reps": a.reps,
        "baseline": a.baseline,
        "compiled_kernels": compiled,
        "target_overhead_vs_gemm": TARGET_OVERHEAD,
        "rows": rows,
        "machine": {**before, "torch": torch.__version__, "threads": torch.get_num_threads()},
        "load_average_after": cpu_record()["load_average"],
    }
    if a.torch_profile:
        table = profile(fb, c16, mean, fq, k, reranks[0], chunks[0])
        print(f"\ntorch profiler, one search (chunk {chunks[0]}, rerank {reranks[0]}):\n{table}")
        result["torch_profile"] = table
    atomic_write_json(out, result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
