"""``--index auto``: the exact search or the approximate bf16 one, whichever is faster on this machine, the
approximate one only where it finds the exact neighbours on these features.

:func:`choose_index_kind` takes the bank and the queries (l2-normalised), searches ``probe`` evenly spaced
queries both ways and

1. measures the recall@k of the bf16 search against the exact one on them: below ``min_recall`` (default
   :data:`MIN_RECALL`, the target the bf16 kind is held to in ``benchmarks/knn_eval.py``) the exact search is
   chosen without timing (a random-init network's features, all similarities within 0.97-0.99, are such a
   case);
2. otherwise times both searches on the probe queries through the core's probe
   (:func:`simsiam_kit.utils.probe.choose_fastest`: alternating calls, cached per machine under the CPU model,
   its bf16/AMX flags, the bank's shape, k, rerank and the device) and takes the faster. On AMD EPYC with
   AVX512-BF16 and on Intel Xeon with AMX the bf16 GEMM is the faster product; on a CPU without native bf16
   it is emulated and slower, which the probe finds.

The recall is measured on every call (it depends on the features, not the machine); the timing is what the
cache keeps. Only the torch backend has the bf16 kind: with ``backend="faiss"`` the choice is ``flat``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from simsiam_kit.retrieval.index import RERANK, EmbeddingIndex

MIN_RECALL = 0.99
PROBE_QUERIES = 256


def choose_index_kind(
    bank: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    backend: str = "auto",
    rerank: Optional[int] = None,
    min_recall: float = MIN_RECALL,
    probe: int = PROBE_QUERIES,
    device=None,
    cache=None,
    use_cache: bool = True,
) -> dict:
    """``{"kind": "flat" | "bf16", "how", "reason", "recall_at_k", "probe_queries", "seconds"}``: see the module
    docstring. ``rerank``: the bf16 kind's (default :data:`~simsiam_kit.retrieval.index.RERANK`)."""
    from simsiam_kit.utils.probe import choose_fastest

    rerank = RERANK if rerank is None else int(rerank)
    n, d = bank.shape
    k = min(int(k), n)
    if backend == "faiss":
        return {"kind": "flat", "how": "only candidate", "reason": "the faiss backend has no bf16 search",
                "recall_at_k": None, "probe_queries": 0, "seconds": {}}  # fmt: skip
    rows = np.unique(np.linspace(0, len(queries) - 1, min(probe, len(queries))).round().astype(np.int64))
    q = queries[torch.from_numpy(rows).to(queries.device)]
    exact = EmbeddingIndex(d, "flat", "torch", device=device).add(bank)
    approx = EmbeddingIndex(d, "bf16", "torch", device=device, rerank=rerank).add(bank)
    _, ex_ids = exact.search(q, k)
    _, ap_ids = approx.search(q, k)  # also builds the centred bf16 bank, outside the timing below
    recall = float((ap_ids.unsqueeze(2) == ex_ids.unsqueeze(1)).any(2).float().mean())
    out = {"recall_at_k": round(recall, 4), "probe_queries": int(len(rows)), "rerank": rerank}
    if recall < min_recall:
        reason = f"bf16 finds {recall:.3f} of the exact {k} neighbours on {len(rows)} queries (< {min_recall})"
        return {"kind": "flat", "how": "recall", "reason": reason, "seconds": {}, **out}
    facts = {"bank": [int(n), int(d)], "k": k, "rerank": rerank, "device": str(exact.device), "queries": len(rows)}
    c = choose_fastest(
        {"flat": lambda: exact.search(q, k), "bf16": lambda: approx.search(q, k)},
        "knn index kind",
        facts,
        cache=cache,
        use_cache=use_cache,
    )
    reason = f"{c.reason}; bf16 recall@{k} {recall:.3f} on {len(rows)} queries"
    return {"kind": c.name, "how": c.how, "reason": reason, "seconds": c.seconds, **out}
