"""The index: the only code in simsiam-kit that searches, and the one place of the tie rule.

``EmbeddingIndex(dim, kind, backend)`` stores l2-normalised vectors (inner product = cosine
similarity) and returns the k nearest of each query: ``search(queries, k) -> (similarities, ids)``,
each (Q, k). numpy in, numpy out; a torch tensor in, tensors out on the queries' device. It serves
the kNN classifier (:mod:`simsiam_kit.retrieval.knn`: the pretraining monitor and ``eval knn``) and
embedding search (:mod:`simsiam_kit.retrieval.embed_search`: ``simsiam-kit embed`` / ``search``).

Backends:

* ``torch``: exact chunked matmul + top-k (:func:`knn_search_torch`; on the CPU a two-stage
  selection through block maxima, :func:`select_topk`), on ``device`` when given, else on the GPU
  when torch sees one (``use_gpu`` decides), else on the CPU.
* ``torch`` with ``kind="bf16"`` (approximate, opt-in): similarities from a bf16 GEMM against the
  centred bank, the candidates around the k-th place re-scored in fp32 (:func:`knn_search_bf16`); its
  recall is measured, not guaranteed (``eval knn`` reports it against the exact search on 500 queries).
* ``faiss``: ``IndexFlatIP`` (exact), ``IndexIVFFlat`` (``kind="ivf"``), ``IndexHNSWFlat``
  (``kind="hnsw"``), ``IndexIVFScalarQuantizer`` (``kind="ivfsq"``), ``IndexIVFPQ`` (``kind="ivfpq"``) or OPQ +
  ``IndexIVFPQ`` (``kind="opq_ivfpq"``);
  moved to the GPU when faiss-gpu sees one (not HNSW, not on-disk lists). faiss is imported lazily.
  Indexes larger than RAM are built by :mod:`simsiam_kit.retrieval.index_build` (``simsiam-kit index
  build``), which also measures their recall@10 against the exact search and records it in
  ``index.json`` (:attr:`EmbeddingIndex.recall`); :meth:`EmbeddingIndex.set_search_params` sets the
  search-time knobs (``nprobe`` of the IVF kinds, ``ef`` of HNSW).
* ``auto`` (a fixed, documented rule, backed by ``benchmarks/knn_eval.py``):

  - ``ivf`` / ``hnsw``: faiss (torch has no such index); ``bf16``: torch (faiss has no such search);
  - ``flat`` with faiss-gpu and a visible GPU: faiss on the GPU;
  - ``flat`` otherwise: torch (on the GPU when CUDA is available). On the reference CPUs a chunked
    torch matmul + top-k beats faiss-cpu's ``IndexFlatIP`` search at k=200 (see
    ``benchmarks/results/knn_eval.json``), and a CUDA torch matmul beats faiss-cpu by far when
    faiss has no GPU support.

The tie rule (:func:`settle_ties`, applied to what every backend returns): similarities
descending, equal similarities ordered by increasing index, including at the k-th place (when
several vectors tie with the k-th similarity, the lowest indices are kept). Exact backends therefore
return the same neighbours.

Where a change goes: a new backend is a branch of :meth:`EmbeddingIndex.add` / ``search`` / ``save``
/ ``load`` that hands its k + 1 best (exact) or k best (approximate) to :func:`settle_ties`; the order
of neighbours changes in :func:`settle_ties` only (and its torch form for approximate lists,
:func:`order_ties`, which the bf16 kind uses to stay off numpy); what is done with neighbours (votes, accuracy,
retrieval metrics, search tables) lives with their consumers, never here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from simsiam_kit.errors import UserError, require_extra
from simsiam_kit.retrieval.files import IVF_KINDS, SQ_QTYPE

KINDS = ("flat", "bf16", "ivf", "hnsw", "ivfsq", "ivfpq", "opq_ivfpq")
#: the backend each kind needs (``flat``: either); also what ``auto`` picks for them
KIND_BACKEND = {"bf16": "torch", **dict.fromkeys(("ivf", "hnsw", "ivfsq", "ivfpq", "opq_ivfpq"), "faiss")}
BACKENDS = ("auto", "faiss", "torch")
#: What :meth:`EmbeddingIndex.save` writes to ``index.json`` and :meth:`EmbeddingIndex.load` requires.
INDEX_JSON_KEYS = {"dim": int, "kind": str, "backend": str, "nlist": int, "nprobe": int, "hnsw_m": int, "ntotal": int}


# ------------------------------------------------------------------------------------ the tie rule
def check_k(k, limit: Optional[int] = None, name: str = "k", pool: str = "") -> tuple:
    """The one check of a neighbour count: ``k`` (an int or several) as ints without repeats, in order.
    Raises when one is below 1 or, given ``limit`` (the vectors searched), above it; ``name`` is the
    caller's name for k (the CLI layer passes its option) and ``pool`` says what was searched."""
    ks = tuple(dict.fromkeys(int(x) for x in (k if isinstance(k, (list, tuple)) else (k,))))
    if not ks or min(ks) < 1:
        raise UserError(f"{name} must be at least 1, got {min(ks) if ks else 'none'}")
    if limit is not None and max(ks) > limit:
        raise UserError(f"{name} {max(ks)} is larger than {pool or f'the number of vectors ({limit})'}")
    return ks


def settle_ties(v: np.ndarray, i: np.ndarray, k: int, row: Optional[Callable[[int], np.ndarray]] = None):
    """The tie rule, for every backend: ``(similarities, ids)`` (Q, k), similarities descending, equal
    similarities by increasing id, and at the cut the lowest ids among those tying with the k-th.

    ``v``, ``i``: (Q, kk) what a backend returned, similarities descending (any order among equal
    ones). An exact backend searches one deeper, kk = k + 1, so that a tie across the cut shows as
    ``v[:, k] == v[:, k - 1]``; for those rows (few, on real features) ``row(r)`` gives row r's
    similarities to every stored vector, and its k best are rebuilt from them. An approximate backend
    passes kk = k and no ``row``: the ties inside its lists are ordered, its cut stays as found.

    numpy on purpose: the work is small (Q x k) and on a busy machine small multi-threaded torch ops stall
    on the OpenMP barrier (the figure: docs/benchmarks.md, "Figures behind design choices").
    """
    redo = np.zeros(len(v), dtype=bool)
    if v.shape[1] > k:
        straddle = np.flatnonzero(v[:, k] == v[:, k - 1])
        v, i = v[:, :k].copy(), i[:, :k].copy()
        for r in straddle:
            if row is None:
                raise ValueError("a tie across the cut of an exact list (kk = k + 1) needs row() to settle it")
            x = row(int(r))
            kth = np.partition(x, len(x) - k)[len(x) - k]  # the row's k-th largest similarity
            above = np.flatnonzero(x > kth)  # fewer than k of them
            eq = np.flatnonzero(x == kth)[: k - len(above)]  # lowest ids first
            i[r] = np.concatenate([above, eq])
            v[r] = x[i[r]]
        redo[straddle] = True  # rebuilt rows are ordered below
    # equal similarities by increasing id: only rows that hold a tie (or were rebuilt) need the sort
    tied = np.flatnonzero(redo | (v[:, 1:] == v[:, :-1]).any(1))
    if len(tied):
        o = np.lexsort((i[tied], -v[tied]), axis=-1)
        v[tied] = np.take_along_axis(v[tied], o, -1)
        i[tied] = np.take_along_axis(i[tied], o, -1)
    return v, i


# ------------------------------------------------------------------------------------ torch backend
#: memory budget, in bytes, of the similarity block of one GEMM of a chunked search (chunk x bank rows entries)
CHUNK_MEMORY = 256 * 2**20
#: the most queries per GEMM of the exact fp32 search (:func:`knn_search_torch`)
FP32_CHUNK = 1024
#: the most queries per GEMM of the bf16 search (:func:`knn_search_bf16`): the selection's cost above the bare GEMM,
#: as a share of it, fell from 65-80 % at 1,024 queries to 34-42 % at 2,048 (one thread, docs/benchmarks.md, "The
#: approximate kNN against its GEMM floor")
BF16_CHUNK = 2048


def query_chunk(bank_rows: int, itemsize: int, largest: int, memory: int = CHUNK_MEMORY) -> int:
    """Queries per GEMM of a chunked search: ``largest``, halved until the (chunk x ``bank_rows``) similarity
    block of ``itemsize``-byte entries (the largest buffer of the search, reused by every chunk) fits in
    ``memory`` bytes; at least 1 (a bank so large that one row of similarities exceeds ``memory`` is searched
    one query at a time).

    Worked numbers at the default budget (:data:`CHUNK_MEMORY`, 256 MiB = 268,435,456 bytes):

    * bf16 (2 bytes, ``largest`` :data:`BF16_CHUNK` = 2,048): a 45,000-row bank (CIFAR-10's train set) takes
      2,048 (2,048 x 45,000 x 2 = 184,320,000 bytes, 176 MiB); 65,536 rows still 2,048 (exactly 256 MiB); 100,000
      rows 1,024 (2,048 would need 409,600,000 bytes; 1,024 needs 204,800,000); 1,281,167 rows (ImageNet's train
      set) 64 (64 x 1,281,167 x 2 = 163,989,376 bytes; 128 would need 327,978,752);
    * fp32 (4 bytes, ``largest`` :data:`FP32_CHUNK` = 1,024): 45,000 rows 1,024 (184,320,000 bytes); 1,281,167
      rows 32.

    The chunk changes the time and the memory, never a result: every query row is searched on its own."""
    per_query = max(1, int(bank_rows)) * int(itemsize)
    c = max(1, int(largest))
    while c > 1 and c * per_query > memory:
        c //= 2
    return c


@torch.no_grad()
def knn_search_torch(
    bank: torch.Tensor, queries: torch.Tensor, k: int, chunk: Optional[int] = None, memory: int = CHUNK_MEMORY
):
    """Exact inner-product top-k by chunked matmul on the bank's device: (similarities, indices),
    each (Q, k), in the order of :func:`settle_ties`. ``chunk``: queries per GEMM; None: :func:`query_chunk`
    of the bank (at most :data:`FP32_CHUNK`, the similarity block within ``memory`` bytes)."""
    n = bank.shape[0]
    if chunk is None:
        chunk = query_chunk(n, bank.element_size(), FP32_CHUNK, memory)
    k = min(k, n)
    kk = min(k + 1, n)  # one extra: a tie across the cut shows as v[k] == v[k-1]
    sims, idxs = [], []
    bank_t = bank.t()  # a transposed view: the GEMM reads it in place (no copy of the bank per call)
    out = _buffer(min(chunk, queries.shape[0]), n, bank)
    for s in range(0, queries.shape[0], chunk):
        q = queries[s : s + chunk]
        sim = torch.matmul(q, bank_t, out=out[: q.shape[0]])
        v, i = select_topk(sim, kk) if sim.device.type == "cpu" else torch.topk(sim, kk, dim=1)
        v, i = settle_ties(v.cpu().numpy(), i.cpu().numpy(), k, _row_reader(sim))
        sims.append(v)
        idxs.append(i)
    return _stacked(sims, idxs, k, bank)


def _stacked(sims: list, idxs: list, k: int, bank: torch.Tensor):
    """The per-chunk numpy results of a torch search as two (Q, k) tensors on the bank's device."""
    if not sims:
        return bank.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.int64, device=bank.device)
    v = torch.from_numpy(sims[0] if len(sims) == 1 else np.concatenate(sims))
    i = torch.from_numpy(idxs[0] if len(idxs) == 1 else np.concatenate(idxs))
    return v.to(bank.device), i.to(bank.device)


#: default ``rerank`` of the ``bf16`` kind: the 2 x RERANK candidates around the k-th place are re-scored in fp32
RERANK = 16


@torch.no_grad()
def knn_search_bf16(
    bank: torch.Tensor,
    bank_c16: torch.Tensor,
    mean: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    rerank: int = RERANK,
    chunk: Optional[int] = None,
    sub: int = 256,
    memory: int = CHUNK_MEMORY,
    compiled: bool = True,
):
    """Approximate inner-product top-k (the ``bf16`` index kind): (similarities, indices), each (Q, k).

    1. bf16 similarities: ``queries (bf16) @ bank_c16.T + queries @ mean`` where ``bank_c16`` is the
       bank minus its ``mean``, in bf16. Subtracting one vector from every bank vector shifts a query's
       similarities by the same q.mean (added back in fp32), so the ranking is unchanged, while the bf16
       rounding (of the inputs and of the bf16 output of the CPU GEMM) shrinks with ||b - mean|| instead
       of ||b||. On clustered features (all similarities near 1, as a random-init ResNet's) this decides
       whether the true neighbours are found at all (docs/evaluation.md; tests/retrieval/test_index.py);
    2. the cut in fp32: with m = ``rerank``, the k + m best by bf16 similarity are the candidates (selected
       in two exact stages through block maxima, :func:`select_topk`, on the bf16 matrix itself: no copy
       or conversion of the (chunk x N) similarities); the k - m best of them are kept with their bf16
       similarities (their error against fp32: docs/evaluation.md), the 2m candidates around the k-th
       place are re-scored exactly (fp32 dot products with the stored vectors, gathered ``sub`` queries at a
       time) and the m best of those fill the last m places. With m >= k every candidate is re-scored and
       every similarity returned is fp32.

    A true neighbour is lost when its bf16 similarity ranks it below k + m others, or above k - m
    by mistake of another; the recall is measured, not guaranteed (``eval knn`` reports it against the
    exact search; ``benchmarks/knn_eval.py``). The k found are ordered by the tie rule for approximate
    lists (:func:`order_ties`, the torch form of :func:`settle_ties` without a row: the cut stays as
    found), written straight into the (Q, k) result: the time above the bare bf16 GEMM is what
    ``benchmarks/knn_profile.py`` measures.

    ``chunk``: queries per GEMM. None (the default) chooses it from the bank and a memory budget
    (:func:`query_chunk`): the (chunk x N) bf16 similarity block, ``chunk x N x 2`` bytes, must fit in ``memory``
    (:data:`CHUNK_MEMORY`, 256 MiB); the chunk is :data:`BF16_CHUNK` (2,048, where the selection's overhead above
    the GEMM measured lowest) when it fits, halved until it does for larger banks: 2,048 up to 65,536 bank
    rows, 1,024 for 100,000, 64 for ImageNet's 1,281,167. Results do not depend on the chunk.

    On the CPU where numba is installed (``compiled``), the selection and step 2 run row by row in compiled
    kernels (:mod:`simsiam_kit.retrieval.select_kernels`): the same candidates, cut and order, with two
    differences of no consequence: equal bf16 similarities are taken by increasing id where torch takes any of
    them, and the fp32 re-scoring sums in another order (within a few ulp of ``torch.bmm``).
    """
    n, nq = bank.shape[0], queries.shape[0]
    if chunk is None:
        chunk = query_chunk(n, 2, BF16_CHUNK, memory)  # the similarities are bf16
    k = min(k, n)
    m = max(0, int(rerank))
    kc = min(n, k + m)  # candidates
    keep = max(0, k - m)  # places kept with their bf16 similarities; the rest of the candidates is the band
    band = kc - keep
    out_v = torch.empty((nq, k), dtype=torch.float32, device=bank.device)
    out_i = torch.empty((nq, k), dtype=torch.int64, device=bank.device)
    if nq == 0:
        return out_v, out_i
    bank_t = bank_c16.t()
    approx_out = _buffer(min(chunk, nq), n, bank_c16)
    if bank.device.type == "cpu":
        select: Callable = lambda x, kk: select_topk(x, kk, compiled=compiled)  # noqa: E731
    else:
        select = lambda x, kk: torch.topk(x, kk, dim=1)  # noqa: E731
    q16 = queries.to(torch.bfloat16) if kc < n else None  # once, not per chunk
    fp32 = bank.dtype == queries.dtype == torch.float32
    finish = kernels() if compiled and fp32 and _compiled_ok(bank) else None  # step 2 compiled (else in torch)
    bank_np = bank.numpy() if finish is not None else None
    rows_out = _buffer(min(sub, nq) * band, bank.shape[1], bank) if kc < n and finish is None else None
    for s in range(0, nq, chunk):
        q = queries[s : s + chunk]
        ov, oi = out_v[s : s + len(q)], out_i[s : s + len(q)]  # each chunk's results go straight in: no cat
        if kc == n:  # the candidates are the whole bank: exact scores of everything
            v, i = torch.topk(q @ bank.t(), k, dim=1)
            ov[:], oi[:] = order_ties(v, i)
            continue
        assert q16 is not None  # set whenever the candidates are not the whole bank
        approx = torch.matmul(q16[s : s + len(q)], bank_t, out=approx_out[: q.shape[0]])
        av, cand = select(approx, kc)  # sorted by bf16 similarity, descending
        if finish is not None:
            qc = q.contiguous()
            args = (av.float().numpy(), cand.numpy(), (qc @ mean).numpy(), bank_np, qc.numpy(), keep, k)
            run_rows(finish.finish_rows, len(q), args, (ov.numpy(), oi.numpy()))
            continue
        if keep:
            torch.add(av[:, :keep], (q @ mean).unsqueeze(1), out=ov[:, :keep])  # in fp32, as av.float() + q.mean
            oi[:, :keep] = cand[:, :keep]
        if band:
            band_ids = cand[:, keep:]
            assert rows_out is not None  # set for torch's step 2 whenever the candidates are not the whole bank
            for u in range(0, q.shape[0], sub):
                ids = band_ids[u : u + sub]
                rows = torch.index_select(bank, 0, ids.reshape(-1), out=rows_out[: ids.numel()])
                ex = torch.bmm(rows.view(ids.shape[0], band, -1), q[u : u + sub].unsqueeze(2)).squeeze(2)
                v, j = torch.topk(ex, k - keep, dim=1)
                ov[u : u + sub, keep:], oi[u : u + sub, keep:] = v, torch.gather(ids, 1, j)
        ov[:], oi[:] = order_ties(ov, oi)
    return out_v, out_i


def order_ties(v: torch.Tensor, i: torch.Tensor):
    """:func:`settle_ties` for an approximate list (kk = k, no ``row``), in torch and without a copy to numpy:
    similarities descending, equal similarities by increasing id, whatever order ``v`` / ``i`` (Q, k) come in
    (the ids of a row are distinct).

    float32 similarities and ids below 2^31 (every bank that fits in memory): one sort of an int64 key per
    entry, the similarity's bits made order-preserving as an integer (negative floats: every bit but the sign
    flipped; -0.0 counted as 0.0) in the high 33 bits and 2^31 - 1 - id in the low 31, so that descending keys
    are descending similarities, then increasing ids (about half the time of two sorts; figure in
    docs/benchmarks.md). Other dtypes: two sorts, by id, then stably by similarity."""
    if v.shape[1] <= 1:
        return v.contiguous(), i.contiguous()
    if v.dtype == torch.float32 and i.dtype == torch.int64:
        bits = (v + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0, which it equals
        key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
        key = key.bitwise_left_shift_(31).bitwise_or_(_ID_MASK - i)
        key, o = torch.sort(key, dim=1, descending=True)
        return torch.gather(v, 1, o), key.bitwise_and_(_ID_MASK).neg_().add_(_ID_MASK)
    by_id, o = torch.sort(i, dim=1)
    vs, o2 = torch.sort(torch.gather(v, 1, o), dim=1, descending=True, stable=True)
    return vs, torch.gather(by_id, 1, o2)


def _row_reader(sim: torch.Tensor) -> Callable[[int], np.ndarray]:
    """``row`` of :func:`settle_ties` for one chunk's similarity matrix."""
    return lambda r: sim[r].cpu().numpy()


_ID_MASK = 2**31 - 1  # order_ties' key: the ids it orders are below 2^31


def _buffer(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """An output buffer reused by every chunk of a search: a fresh (chunk x N) result per chunk costs its page
    faults each time (the figure: docs/benchmarks.md, "Figures behind design choices")."""
    return torch.empty((max(rows, 1), cols), dtype=like.dtype, device=like.device)


BLOCK = 16

_KERNELS: Any = None  # the compiled kernels module once looked for; False: numba is not installed


def kernels():
    """:mod:`simsiam_kit.retrieval.select_kernels` (numba, the ``cpu`` extra), or None where numba cannot be
    imported: then the torch forms of the same steps run (the same values; slower on the CPU)."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from simsiam_kit.retrieval import select_kernels

            _KERNELS = select_kernels
        except ImportError:
            _KERNELS = False
    return _KERNELS or None


def run_rows(fn: Callable, rows: int, before: tuple, after: tuple) -> None:
    """``fn(*before, lo, hi, *after)`` over rows ``[0, rows)``, split into ``torch.get_num_threads()`` contiguous
    ranges run on as many Python threads (the kernels release the GIL); one range runs in this thread."""
    threads = max(1, min(torch.get_num_threads(), rows // 64))
    if threads == 1:
        fn(*before, 0, rows, *after)
        return
    from concurrent.futures import ThreadPoolExecutor

    step = -(-rows // threads)
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(fn, *before, a, min(a + step, rows), *after) for a in range(0, rows, step)]
        for f in futures:
            f.result()


def _compiled_ok(x: torch.Tensor) -> bool:
    """Whether the compiled kernels can read ``x`` in place: on the CPU, rows of unit stride, below 2^31 columns."""
    return x.device.type == "cpu" and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] < 2**31


def select_topk(sim: torch.Tensor, kk: int, block: int = BLOCK, compiled: bool = True):
    """``torch.topk(sim, kk, dim=1)`` (the same values, sorted descending; equal values at the cut may come from
    other columns, which :func:`settle_ties` settles) in two exact stages, faster on the CPU for kk << columns
    (docs/benchmarks.md; ``benchmarks/knn_profile.py`` times it); any dtype (the bf16 kind selects on its bf16
    similarities).

    On the CPU, for bf16 and float32 and where numba is installed (``compiled``), the stages run one row at a time
    in :func:`simsiam_kit.retrieval.select_kernels.select_rows` (candidates: the entries >= the kk-th largest
    block maximum; equal values ordered by increasing column); otherwise in torch, as follows:

    1. the columns are grouped into ``nb = n // block`` blocks, block j holding columns j, j + nb,
       j + 2 nb, ... (a strided grouping: the block maxima are ``block`` element-wise maxima of
       contiguous rows, one pass over the matrix at memory speed);
    2. the kk blocks with the largest maxima are kept; m is the smallest kept maximum. Every entry
       > m lies in a kept block (its block's maximum is > m). The row's top kk holds e entries > m and
       kk - e entries equal to m (if any); the kept blocks hold those e entries, and at least one
       entry equal to m per kept block whose maximum is m, i.e. kk - (blocks with maximum > m) >=
       kk - e of them. So the candidates' top-kk values are the row's, ties among blocks included;
    3. ``torch.topk`` over the kept blocks' kk x block entries plus the n - nb x block tail columns.
    """
    rows, n = sim.shape
    nb = n // block
    if nb < 4 * kk:  # too few blocks to gain anything
        return torch.topk(sim, kk, dim=1)
    compiled_kernels = kernels() if compiled else None
    if compiled_kernels is not None and sim.dtype in (torch.bfloat16, torch.float32) and _compiled_ok(sim):
        bf16 = sim.dtype == torch.bfloat16
        bits = sim.view(torch.int16 if bf16 else torch.int32).numpy()
        out = np.empty((rows, kk), np.int64)
        run_rows(compiled_kernels.select_rows, rows, (bits, kk, block, 15 if bf16 else 31), (out,))
        col = torch.from_numpy(out)
        return torch.gather(sim, 1, col), col
    head = sim.as_strided((rows, block, nb), (sim.stride(0), nb * sim.stride(1), sim.stride(1)))
    bmax = head.amax(1)  # (rows, nb)
    ib = torch.topk(bmax, kk, dim=1, sorted=False).indices  # (rows, kk)
    # the kept blocks' entries, gathered through the strided view with a broadcast index: the same candidates in
    # the same order as a (rows, block x kk) column index would give (position t * kk + s holds column
    # ib[s] + t * nb, so torch.topk breaks ties as before), without building that int64 index (28 MB per
    # 1,024 x 45,000 chunk), adding to it and concatenating it
    cand = torch.gather(head, 2, ib.unsqueeze(1).expand(rows, block, kk)).view(rows, block * kk)
    tail = n - nb * block
    if tail:
        cand = torch.cat([cand, sim[:, nb * block :]], 1)
    v, j = torch.topk(cand, kk, dim=1)
    t = torch.div(j, kk, rounding_mode="floor")  # the block row; t == block: the tail
    col = torch.gather(ib, 1, torch.remainder(j, kk)).add_(t.mul_(nb))
    if tail:  # positions block x kk and after: column nb x block + (position - block x kk)
        col = torch.where(j < block * kk, col, j + (nb * block - block * kk))
    return v, col


# ------------------------------------------------------------------------------------ the index
def faiss_has_gpu(faiss) -> bool:
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


class EmbeddingIndex:
    """Nearest-neighbour index over l2-normalised vectors; see the module docstring.

    ``device`` (torch backend only): where the vectors are kept and searched; default the GPU when
    torch sees one (unless ``use_gpu=False``), else the CPU.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        backend: str = "auto",
        nlist: int = 0,
        nprobe: int = 16,
        hnsw_m: int = 32,
        use_gpu: Optional[bool] = None,
        device=None,
        rerank: int = RERANK,
    ):
        if kind not in KINDS:
            raise UserError(f"unknown index kind '{kind}' (available: {', '.join(KINDS)})")
        if backend not in BACKENDS:
            raise UserError(f"unknown kNN backend '{backend}' (available: {', '.join(BACKENDS)})")
        need = KIND_BACKEND.get(kind)
        if need and backend not in ("auto", need):
            raise UserError(f"index kind '{kind}' needs the {need} backend ({backend} has no {kind} search)")
        if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 0:
            raise UserError(f"rerank (extra candidates re-scored in fp32) must be an integer >= 0, got {rerank!r}")
        self.rerank = rerank
        self.dim, self.kind, self.nlist, self.nprobe, self.hnsw_m = int(dim), kind, nlist, nprobe, hnsw_m
        self.pq_m = self.opq_dim = 0  # code bytes and OPQ output dimension of the ivfpq / opq_ivfpq kinds
        self.sq_bits = 0  # bits per dimension of the ivfsq kind
        self.use_gpu = use_gpu
        self.backend = self.auto_backend(kind, use_gpu) if backend == "auto" else backend
        if device is not None:
            self.device = torch.device(device)
        else:
            cuda = torch.cuda.is_available() and use_gpu is not False
            self.device = torch.device("cuda" if self.backend == "torch" and cuda else "cpu")
        self._parts: list[torch.Tensor] = []  # torch backend storage (zero-copy views of numpy input)
        self._bank: Optional[torch.Tensor] = None
        self._bank_c16: Optional[tuple] = None  # bf16 kind: (the bank minus its mean in bf16, the mean)
        self._faiss: Any = None  # a faiss index (the faiss backend)
        self._xb: Optional[np.ndarray] = None  # stored vectors, reconstructed only to settle ties (faiss flat)
        self.ef_search: Optional[int] = None  # HNSW efSearch (None: faiss's default, or what the file holds)
        self.recall: Optional[float] = None  # recall@10 measured by `index build`, when it built the index
        self.on_disk = False  # inverted lists memory-mapped from index.ivfdata (built by `index build`)
        self.meta: dict = {}  # index.json of a loaded index

    @property
    def approximate(self) -> bool:
        """Whether a search may miss true neighbours (every kind but ``flat``)."""
        return self.kind != "flat"

    def set_search_params(self, nprobe: Optional[int] = None, ef: Optional[int] = None) -> "EmbeddingIndex":
        """Search-time knobs: ``nprobe`` (IVF kinds: lists visited per query, 1..nlist) and ``ef`` (HNSW:
        candidates kept while walking the graph); more of either finds more true neighbours, slower."""
        from simsiam_kit.retrieval.files import MAX_EF

        for name, v, kinds in (("nprobe", nprobe, IVF_KINDS), ("ef", ef, ("hnsw",))):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"--{name} must be a positive integer, got {v!r}")
            if self.kind not in kinds:
                raise UserError(f"--{name} applies to {' / '.join(kinds)} indexes; this one is {self.kind}")
        if nprobe is not None:
            if self.nlist and nprobe > self.nlist:
                raise UserError(f"--nprobe {nprobe} is larger than the index's {self.nlist} lists")
            self.nprobe = nprobe
        if ef is not None:
            if ef > MAX_EF:
                raise UserError(f"--ef {ef} is larger than {MAX_EF}")
            self.ef_search = ef
        if self._faiss is not None:
            self._apply_search_params()
        return self

    def search_params(self) -> dict:
        """The search-time knobs in effect: ``nprobe`` (IVF kinds), ``ef`` (HNSW, when set), else nothing."""
        if self.kind in IVF_KINDS:
            return {"nprobe": min(self.nprobe, self.nlist) if self.nlist else self.nprobe}
        if self.kind == "hnsw" and self.ef_search is not None:
            return {"ef": self.ef_search}
        return {}

    def describe(self) -> str:
        """One line for people: the kind, whether it is exact, and the recall its build measured."""
        if not self.approximate:
            return f"{self.kind} index: exact"
        knobs = ", ".join(f"{k}={v}" for k, v in self.search_params().items())
        measured = self.meta.get("recall_sweep") or []
        at = ""
        if measured:  # the build stores the setting its recall was measured at (not always the sweep's last)
            key = "nprobe" if self.kind in IVF_KINDS else "ef"
            stored = self.meta.get("nprobe" if key == "nprobe" else "ef_search")
            at = f" at {key}={stored if stored is not None else measured[-1].get(key)}"
        recall = (
            f"recall@10 {self.recall:.3f} measured on {self.meta.get('recall_queries')} held-out vectors{at}"
            if self.recall is not None
            else "recall not measured (build it with `simsiam-kit index build` to measure it)"
        )
        return f"{self.kind} index: approximate, {recall}" + (f"; searching with {knobs}" if knobs else "")

    def _apply_search_params(self) -> None:
        faiss = require_extra("faiss", "cpu")
        if self.kind in IVF_KINDS:
            ivf = faiss.try_extract_index_ivf(self._faiss)
            if ivf is not None:
                ivf.nprobe = min(self.nprobe, ivf.nlist)
            elif hasattr(self._faiss, "nprobe"):  # a GPU index
                self._faiss.nprobe = min(self.nprobe, self.nlist or self.nprobe)
        elif self.kind == "hnsw" and self.ef_search is not None:
            faiss.downcast_index(self._faiss).hnsw.efSearch = self.ef_search

    @staticmethod
    def auto_backend(kind: str, use_gpu: Optional[bool] = None) -> str:
        """The ``auto`` rule of the module docstring."""
        if kind in KIND_BACKEND:
            return KIND_BACKEND[kind]
        if use_gpu is not False and torch.cuda.is_available():
            try:
                import faiss  # noqa: F401  (only probed when a GPU is there)
            except ImportError:
                return "torch"
            return "faiss" if faiss_has_gpu(faiss) else "torch"
        return "torch"

    # ---------------------------------------------------------------- building
    @property
    def ntotal(self) -> int:
        if self.backend == "torch":
            return sum(len(v) for v in self._parts)
        return 0 if self._faiss is None else int(self._faiss.ntotal)

    def _check(self, x):
        """A float32 (N, dim) matrix: a tensor stays a tensor (on its device), anything else becomes numpy."""
        if isinstance(x, torch.Tensor):
            x = x.detach()
            x = x if x.dtype == torch.float32 else x.float()
        else:
            x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(
                f"embedding dimension mismatch: index has dim {self.dim}, got array of shape {tuple(x.shape)}"
            )
        return x

    @staticmethod
    def _numpy(x) -> np.ndarray:
        return np.ascontiguousarray(x.cpu().numpy()) if isinstance(x, torch.Tensor) else x

    def _make_faiss(self, train: Optional[np.ndarray]):
        faiss = require_extra("faiss", "cpu")
        if self.kind == "flat":
            idx = faiss.IndexFlatIP(self.dim)
        elif self.kind == "hnsw":
            idx = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        elif self.kind in ("ivfsq", "ivfpq", "opq_ivfpq"):  # trained on the first batch added, like ivf
            from simsiam_kit.retrieval.index_build import choose_plan

            if train is None:
                raise ValueError(f"a {self.kind} index is trained on its first batch: give the vectors")
            plan = choose_plan(len(train), self.dim, kind=self.kind, nlist=self.nlist or None)
            idx = plan.make()
            idx.train(train)
            self.nlist, self.pq_m, self.opq_dim, self.sq_bits = plan.nlist, plan.pq_m, plan.opq_dim, plan.sq_bits
            faiss.extract_index_ivf(idx).nprobe = min(self.nprobe, plan.nlist)
        else:
            if train is None:
                raise ValueError("an IVF index is trained on the first vectors added")
            n = len(train)
            nlist = self.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 if n >= 39 else 1))
            quant = faiss.IndexFlatIP(self.dim)
            idx = faiss.IndexIVFFlat(quant, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            idx.train(train)
            idx.nprobe = min(self.nprobe, nlist)
            self.nlist = nlist
        want_gpu = self.use_gpu if self.use_gpu is not None else True
        if want_gpu and self.kind != "hnsw" and faiss_has_gpu(faiss):
            self._gpu_res = faiss.StandardGpuResources()
            idx = faiss.index_cpu_to_gpu(self._gpu_res, 0, idx)
        self._faiss = idx
        self._apply_search_params()
        return idx

    def add(self, x) -> "EmbeddingIndex":
        x = self._check(x)
        if self.backend == "torch":
            self._parts.append(x if isinstance(x, torch.Tensor) else torch.from_numpy(x))
            self._bank = self._bank_c16 = None
        else:
            x = self._numpy(x)
            if self._faiss is None:
                self._faiss = self._make_faiss(x)
            self._faiss.add(x)
        return self

    def _torch_bank(self) -> torch.Tensor:
        if self._bank is None:
            bank = self._parts[0] if len(self._parts) == 1 else torch.cat([p.to(self.device) for p in self._parts])
            self._bank = bank.to(self.device)  # no copy of a single part already on the device
        return self._bank

    def _centred_bf16(self) -> tuple:
        if self._bank_c16 is None:
            bank = self._torch_bank()
            mean = bank.mean(0)
            self._bank_c16 = ((bank - mean).to(torch.bfloat16), mean)
        return self._bank_c16

    # ---------------------------------------------------------------- search
    def search(self, queries, k: int):
        """(similarities float32 (Q, k), ids int64 (Q, k)) of the k nearest stored vectors, in the order
        of :func:`settle_ties`: numpy arrays, or tensors on the queries' device when ``queries`` is one."""
        q = self._check(queries)
        n = self.ntotal
        if n == 0:
            raise UserError("the index is empty")
        check_k(k, n, pool=f"the number of indexed vectors ({n})")
        if self.backend == "torch":
            qt = q if isinstance(q, torch.Tensor) else torch.from_numpy(q)
            if self.kind == "bf16":
                c16, mean = self._centred_bf16()
                s, i = knn_search_bf16(self._torch_bank(), c16, mean, qt.to(self.device), k, self.rerank)
            else:
                s, i = knn_search_torch(self._torch_bank(), qt.to(self.device), k)
        else:
            s, i = self._faiss_search(self._numpy(q), k)
            s, i = torch.from_numpy(s), torch.from_numpy(i)
        if isinstance(queries, torch.Tensor):
            return s.to(queries.device), i.to(queries.device)
        return s.cpu().numpy(), i.cpu().numpy()

    def _faiss_search(self, q: np.ndarray, k: int):
        if self.kind != "flat":  # approximate: the ties inside each list are ordered, the cut stays
            s, i = self._faiss.search(q, k)
            return settle_ties(s.astype(np.float32), i.astype(np.int64), k)
        kk = min(k + 1, self.ntotal)  # one extra: a tie across the cut shows as s[k] == s[k-1]
        s, i = self._faiss.search(q, kk)
        s, i = settle_ties(s.astype(np.float32), i.astype(np.int64), k, lambda r: self._faiss_row(q[r]))
        self._xb = None
        return s, i

    def _faiss_row(self, q: np.ndarray) -> np.ndarray:
        """A query's similarities to every stored vector, for rows whose k-th similarity ties across the
        cut: rescored against the stored vectors (float64, rounded to float32). (A faiss re-search cannot
        do this: its kernel, and so the last bit of a similarity, depends on the number of queries.)"""
        if self._xb is None or len(self._xb) != self.ntotal:
            self._xb = self._faiss.reconstruct_n(0, self.ntotal).astype(np.float64)
        return (self._xb @ q.astype(np.float64)).astype(np.float32)

    # ---------------------------------------------------------------- persistence
    def save(self, directory) -> Path:
        """``index.json`` and the vectors (``index_vectors.npy``) or the FAISS file (``index.faiss``) in
        ``directory``, each written atomically: a full disk is one line naming the file."""
        from simsiam_kit.utils.io import atomic_save_npy, atomic_write_bytes, atomic_write_text

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "dim": self.dim,
            "kind": self.kind,
            "backend": self.backend,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "hnsw_m": self.hnsw_m,
            "rerank": self.rerank,
            "ntotal": self.ntotal,
        }
        if self.on_disk:
            raise UserError("an index with on-disk lists is written by `simsiam-kit index build`, not saved again")
        if self.kind in ("ivfsq", "ivfpq", "opq_ivfpq"):
            meta.update(pq_m=self.pq_m, opq_dim=self.opq_dim, sq_bits=self.sq_bits, approximate=True)
        if self.backend == "torch":
            vec = self._torch_bank().cpu().numpy() if self._parts else np.zeros((0, self.dim), np.float32)
            atomic_save_npy(d / "index_vectors.npy", vec)
        else:
            faiss = require_extra("faiss", "cpu")
            idx = self._faiss
            if hasattr(faiss, "index_gpu_to_cpu") and type(idx).__name__.startswith("Gpu"):
                idx = faiss.index_gpu_to_cpu(idx)
            atomic_write_bytes(d / "index.faiss", faiss.serialize_index(idx).tobytes())
        atomic_write_text(d / "index.json", json.dumps(meta, indent=2))
        return d

    @classmethod
    def load(cls, directory, use_gpu: Optional[bool] = None) -> "EmbeddingIndex":
        """The index saved in ``directory`` by :meth:`save`. Nothing in the files is trusted: ``index.json``
        is checked key by key, and the vectors (``index_vectors.npy``) or the FAISS file (``index.faiss``)
        are checked against it and against their own length before anything is allocated for them
        (:mod:`simsiam_kit.retrieval.files`); a bad file is a :class:`UserError` naming it."""
        from simsiam_kit.retrieval.files import MAX_DIM, check_faiss_file, load_npy, read_json

        d = Path(directory)
        meta_p = d / "index.json"
        if not meta_p.is_file():
            raise UserError(f"{d}: no index.json, not a saved index")
        meta = read_json(meta_p, dict)
        for key, tp in INDEX_JSON_KEYS.items():
            if key not in meta:
                raise UserError(f"{meta_p}: missing key '{key}'")
            v = meta[key]
            if not isinstance(v, tp) or isinstance(v, bool):
                want = "an integer" if tp is int else "a string"
                raise UserError(f"{meta_p}: key '{key}' must be {want}, got {repr(v)[:80]}")
        lows = {"dim": 1, "ntotal": 0, "nlist": 0, "nprobe": 1, "hnsw_m": 1}
        for key, low in lows.items():
            if meta[key] < low or (key == "dim" and meta[key] > MAX_DIM):
                want = f"in [1, {MAX_DIM}]" if key == "dim" else f">= {low}"
                raise UserError(f"{meta_p}: key '{key}' must be {want}, got {meta[key]}")
        rerank = meta.get("rerank", RERANK)  # optional: index.json files written before the bf16 kind lack it
        opt = _optional_index_keys(meta, meta_p)
        try:
            self = cls(
                meta["dim"],
                meta["kind"],
                meta["backend"],
                meta["nlist"],
                meta["nprobe"],
                meta["hnsw_m"],
                use_gpu,
                rerank=rerank,
            )
        except UserError as e:
            raise UserError(f"{meta_p}: {e}") from None
        self.meta, self.recall, self.on_disk = meta, opt["recall_at_10"], opt["on_disk"]
        self.pq_m, self.opq_dim, self.ef_search = opt["pq_m"], opt["opq_dim"], opt["ef_search"]
        self.sq_bits = opt["sq_bits"]
        if self.kind in ("ivfpq", "opq_ivfpq") and not self.pq_m or self.kind == "opq_ivfpq" and not self.opq_dim:
            raise UserError(f"{meta_p}: a {self.kind} index needs 'pq_m'{' and opq_dim' * (self.kind == 'opq_ivfpq')}")
        if self.kind == "ivfsq" and self.sq_bits not in SQ_QTYPE:
            raise UserError(f"{meta_p}: an ivfsq index needs 'sq_bits' of 4, 6 or 8, got {self.sq_bits}")
        if self.backend == "torch":
            vec = load_npy(d / "index_vectors.npy", "f", 2, (meta["ntotal"], meta["dim"]))
            if len(vec):
                self.add(vec)
        else:
            faiss = require_extra("faiss", "cpu")
            path = d / "index.faiss"
            ivfdata = d / "index.ivfdata" if self.on_disk else None
            check_faiss_file(
                path, self.kind, self.dim, meta["ntotal"], meta["nlist"], self.pq_m, self.opq_dim, ivfdata, self.sq_bits
            )
            from simsiam_kit.retrieval.index_build import quiet_stdout

            try:  # on-disk lists: their file is found next to the index, whatever path the index file names
                with quiet_stdout():
                    idx = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR if self.on_disk else 0)
            except Exception as e:
                raise UserError(f"{path}: cannot read FAISS index ({str(e).splitlines()[0][:300]})") from None
            gpu_ok = self.kind != "hnsw" and not self.on_disk
            if (use_gpu if use_gpu is not None else True) and gpu_ok and faiss_has_gpu(faiss):
                self._gpu_res = faiss.StandardGpuResources()
                idx = faiss.index_cpu_to_gpu(self._gpu_res, 0, idx)
            self._faiss = idx
            self._apply_search_params()
        return self


#: optional keys of ``index.json`` (written by ``index build``): type check, default
_OPTIONAL = {
    "pq_m": (int, 0),
    "opq_dim": (int, 0),
    "sq_bits": (int, 0),
    "ef_search": (int, None),
    "on_disk": (bool, False),
    "recall_at_10": (float, None),
}


def _optional_index_keys(meta: dict, meta_p: Path) -> dict:
    """The optional keys of ``index.json``, checked: ``pq_m`` / ``opq_dim`` within [0, MAX_DIM], ``ef_search``
    within [1, MAX_EF], ``recall_at_10`` within [0, 1]; missing or null ones get their defaults."""
    from simsiam_kit.retrieval.files import MAX_DIM, MAX_EF

    out: dict[str, Any] = {}
    for key, (tp, default) in _OPTIONAL.items():
        v = meta.get(key)
        if v is None:
            out[key] = default
            continue
        ok = isinstance(v, bool) if tp is bool else isinstance(v, (int, float) if tp is float else int)
        ok = ok and (tp is bool or not isinstance(v, bool))
        if ok and tp is not bool:
            low, high = {"ef_search": (1, MAX_EF), "recall_at_10": (0, 1)}.get(key, (0, MAX_DIM))
            ok = low <= v <= high
        if not ok:
            raise UserError(f"{meta_p}: key '{key}' has an invalid value {repr(v)[:80]}")
        out[key] = float(v) if tp is float else v
    return out
