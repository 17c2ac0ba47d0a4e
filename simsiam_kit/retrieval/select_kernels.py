"""Compiled kernels of the CPU kNN search (numba, part of the ``cpu`` extra): the candidate selection of
:func:`simsiam_kit.retrieval.index.select_topk` and the re-scoring and ordering of the ``bf16`` kind
(:func:`simsiam_kit.retrieval.index.knn_search_bf16`), one query row at a time in one pass each.

The torch forms of the same steps (kept, and used where numba is not installed or the tensors are not on the
CPU) are sequences of whole-matrix operations: block maxima, ``torch.topk`` over them, a gather of the kept
blocks, a second ``torch.topk``, then a gather of the band's rows, a batched product, another ``torch.topk`` and a
sort. Each one is a pass over (queries x candidates) memory and a wait at OpenMP's barrier; here each row's work
stays in the core's cache. The time above the bare bf16 GEMM: ``benchmarks/knn_profile.py``, docs/benchmarks.md.

Each kernel works on rows ``[lo, hi)`` and releases the GIL (``nogil``), so :func:`run_rows` splits the rows over
``torch.get_num_threads()`` Python threads; numba's own threading layer is not used (its default, ``workqueue``,
aborts the process when two threads launch parallel kernels at once, as a search service's request threads would).
Compiled on first use and cached beside this file (``cache=True``; a few seconds once per machine).

Orders, as integers (the CPU's integer compares are exact and cheap, and a float's bits become an ordered integer
by flipping every bit but the sign of a negative number):

* the selection ranks entries by their similarity's ordered bits, then by increasing column (a deterministic tie
  rule: ``torch.topk`` breaks ties arbitrarily); -0.0 ranks just below 0.0, which refines the order of values and
  so still selects a top kk by value;
* the final lists follow :func:`~simsiam_kit.retrieval.index.order_ties`: similarity descending (-0.0 counted as
  0.0), then increasing id.
"""

from __future__ import annotations

import numba
import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_ID_MASK = 2**31 - 1


@numba.njit(nogil=True, cache=True, inline="always")
def _ordered(b, sh, low):
    """The bits ``b`` of a float (int16 for bf16, int32 for float32; ``sh`` = bits - 1, ``low`` = 2**sh - 1) as an
    integer in the float's order."""
    return b ^ ((b >> sh) & low)


@numba.njit(nogil=True, cache=True)
def select_rows(bits, kk, block, sh, lo, hi, out):
    """The kk best columns of rows ``[lo, hi)`` of ``bits`` (a similarity matrix's bits, see :func:`_ordered`),
    written to ``out[r]`` best first, by value then increasing column. Exact, in two stages (the same argument as
    :func:`~simsiam_kit.retrieval.index.select_topk`): block j holds columns j, j + nb, ..., j + (block - 1) nb
    (nb = n // block; every column after nb x block is a block of its own); m = the kk-th largest block maximum;
    every entry of the row's top kk is >= m and lies in a block whose maximum is >= m; those entries are the
    candidates (at least kk of them), and their best kk, by value then column, are the row's."""
    n = bits.shape[1]
    nb = n // block
    nblocks = nb + (n - nb * block)
    low = (1 << sh) - 1
    half = 1 << sh
    bm = np.empty(nblocks, np.int64)
    cand = np.empty(n, np.uint64)
    for r in range(lo, hi):
        row = bits[r]
        for j in range(nb):
            bm[j] = _ordered(np.int64(row[j]), sh, low)
        for t in range(1, block):
            base = t * nb
            for j in range(nb):
                v = _ordered(np.int64(row[base + j]), sh, low)
                if v > bm[j]:
                    bm[j] = v
        tail0 = nb * block - nb  # column of tail block j (j >= nb): tail0 + j
        for j in range(nb, nblocks):
            bm[j] = _ordered(np.int64(row[tail0 + j]), sh, low)
        m = np.partition(bm, nblocks - kk)[nblocks - kk]
        c = 0
        for j in range(nblocks):
            if bm[j] < m:
                continue
            if j < nb:
                for t in range(block):
                    col = j + t * nb
                    v = _ordered(np.int64(row[col]), sh, low)
                    if v >= m:
                        cand[c] = (np.uint64(v + half) << np.uint64(32)) | (_MASK32 - np.uint64(col))
                        c += 1
            else:
                col = tail0 + j
                cand[c] = (np.uint64(bm[j] + half) << np.uint64(32)) | (_MASK32 - np.uint64(col))
                c += 1
        top = cand[:c]
        if c > kk:
            top = np.partition(top, c - kk)[c - kk :]
        top = np.sort(top)
        for i in range(kk):
            out[r, i] = np.int64(_MASK32 - (top[kk - 1 - i] & _MASK32))


@numba.njit(nogil=True, cache=True, fastmath=True, inline="always")
def _dot(a, b):
    """fp32 dot product, accumulated in fp32 in the order the vectoriser chooses (as a BLAS would)."""
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@numba.njit(nogil=True, cache=True)
def finish_rows(av, cols, qm, bank, q, keep, k, lo, hi, out_v, out_i):
    """The bf16 search's last step for rows ``[lo, hi)``: ``cols[r]`` are the k + m candidates, best bf16 first,
    ``av[r]`` their bf16 similarities (as float32) without the mean's share ``qm[r]``; the first ``keep`` stay with
    ``av + qm``; the rest (the band) are re-scored exactly (``bank[c] . q[r]``, fp32) and the best k - keep of them
    by (score, then increasing id) fill the last places; the k are written to ``out_v[r]`` / ``out_i[r]`` in the
    order of ``order_ties``."""
    kc = cols.shape[1]
    band = kc - keep
    m = k - keep
    vals = np.empty(k, np.float32)
    vbits = vals.view(np.int32)
    ids = np.empty(k, np.int64)
    keys = np.empty(k, np.int64)
    bvals = np.empty(max(band, 1), np.float32)
    bbits = bvals.view(np.int32)
    bkeys = np.empty(max(band, 1), np.int64)
    for r in range(lo, hi):
        for i in range(keep):
            vals[i] = np.float32(av[r, i] + qm[r]) + np.float32(0.0)
            ids[i] = cols[r, i]
        if band:
            for i in range(band):
                c = cols[r, keep + i]
                bvals[i] = _dot(bank[c], q[r]) + np.float32(0.0)
                bkeys[i] = (np.int64(_ordered(bbits[i], 31, 0x7FFFFFFF)) << 31) | (_ID_MASK - c)
            o = np.argsort(bkeys[:band])
            for i in range(m):
                j = o[band - 1 - i]
                vals[keep + i] = bvals[j]
                ids[keep + i] = cols[r, keep + j]
        for i in range(k):
            keys[i] = (np.int64(_ordered(vbits[i], 31, 0x7FFFFFFF)) << 31) | (_ID_MASK - ids[i])
        o = np.argsort(keys)
        for i in range(k):
            j = o[k - 1 - i]
            out_v[r, i] = vals[j]
            out_i[r, i] = ids[j]
