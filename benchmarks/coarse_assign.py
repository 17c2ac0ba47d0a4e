"""The coarse assignment of an IVF build at 65,536 lists: which list each added vector goes to, and at what cost.

    python benchmarks/coarse_assign.py [--train 1000000] [--vectors 20000] [--nlist 65536]
    python benchmarks/coarse_assign.py --smoke        # seconds: 4,096 lists, writes /tmp

``index build`` adds each vector to the list of its nearest centroid as found by the HNSW graph over the centroids
(``IVF65536_HNSW32``, efSearch :data:`~simsiam_kit.retrieval.index_build.COARSE_EF_ADD` while adding); at 10M
vectors that search is nearly all of the build (session 7: 1,611 s of 1,792). This script measures, on the
clustered mixture of ``benchmarks/index_build.py`` (version 3) and centroids trained as ``index build`` trains
them (:func:`~simsiam_kit.retrieval.index_build.two_level_centroids` on ``--train`` vectors), the share of vectors
assigned to their exact nearest centroid (by a GEMM over all centroids) and the time per vector, for:

* ``flat efE``: ``IndexHNSWFlat`` over the float32 centroids (what the build uses), efSearch E;
* ``sq8 efE rR``: ``IndexHNSWSQ`` over the centroids in 8-bit scalar-quantized form (a quarter of the bytes to
  read per distance), the best R by the quantized distance re-ranked exactly (numpy, R > 1) - a candidate for a
  faster assignment, not used by the build.

Results: a table on stdout and ``benchmarks/results/coarse_assign.json`` (``--smoke``: ``/tmp``), with the CPU and
the load before and after. Threads: faiss's default (every core).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, cpu_record, print_table  # noqa: E402
from index_build import Mixture  # noqa: E402

from simsiam_kit.retrieval.index_build import two_level_centroids  # noqa: E402
from simsiam_kit.utils.io import atomic_write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1_000_000, help="vectors the centroids are trained on")
    ap.add_argument("--vectors", type=int, default=20_000, help="vectors assigned (the measured ones)")
    ap.add_argument("--nlist", type=int, default=65_536)
    ap.add_argument("--flat-efs", default="16,24,32")
    ap.add_argument("--sq8-efs", default="16,24,32,48,64")
    ap.add_argument("--reranks", default="1,4")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.smoke:
        a.train, a.vectors, a.nlist, a.flat_efs, a.sq8_efs, a.reranks = 200_000, 2_000, 4_096, "16", "16", "1,4"
    import faiss

    before = cpu_record()
    mix = Mixture(10_000_000, 512, 10_000, 0.05, 100_000, seed=0)  # index_build.py's 10M mixture, version 3
    xt = np.concatenate(
        [mix.draw(min(100_000, a.train - s), (0, 1, i)) for i, s in enumerate(range(0, a.train, 100_000))]
    )
    t = time.perf_counter()
    cent = np.ascontiguousarray(two_level_centroids(xt, a.nlist, 0), dtype=np.float32)
    train_s = time.perf_counter() - t
    del xt
    x = mix.draw(a.vectors, (0, 1, 50))  # a chunk the centroids were not trained on
    best = np.concatenate([np.argmax(x[s : s + 2000] @ cent.T, axis=1) for s in range(0, len(x), 2000)])
    flat = faiss.IndexHNSWFlat(512, 32, faiss.METRIC_INNER_PRODUCT)
    flat.add(cent)
    sq8 = faiss.IndexHNSWSQ(512, faiss.ScalarQuantizer.QT_8bit, 32, faiss.METRIC_INNER_PRODUCT)
    sq8.train(cent)
    sq8.add(cent)

    def run(index, ef: int, r: int) -> tuple[float, float]:
        index.hnsw.efSearch = ef
        t = time.perf_counter()
        _, ids = index.search(x, r)
        if r > 1:  # the r candidates re-scored exactly
            ids = ids[np.arange(len(x)), np.einsum("nd,nrd->nr", x, cent[ids]).argmax(1)]
        else:
            ids = ids[:, 0]
        return float((ids == best).mean()), (time.perf_counter() - t) / len(x) * 1e6

    rows = []
    for ef in (int(v) for v in a.flat_efs.split(",")):
        hit, us = run(flat, ef, 1)
        rows.append({"quantizer": f"flat ef{ef}", "nearest_list": hit, "us_per_vector": us})
    for ef in (int(v) for v in a.sq8_efs.split(",")):
        for r in (int(v) for v in a.reranks.split(",")):
            hit, us = run(sq8, ef, r)
            rows.append({"quantizer": f"sq8 ef{ef} r{r}", "nearest_list": hit, "us_per_vector": us})
    print_table(rows, ["quantizer", "nearest_list", "us_per_vector"])
    out = Path(a.out) if a.out else (Path("/tmp") if a.smoke else RESULTS) / "coarse_assign.json"
    atomic_write_json(
        out,
        {
            "benchmark": "coarse_assign",
            "settings": {"train": a.train, "vectors": a.vectors, "nlist": a.nlist, "mixture": mix.spec()},
            "centroid_training_s": train_s,
            "rows": rows,
            "machine": {**before, "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads()},
            "load_average_after": cpu_record()["load_average"],
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
