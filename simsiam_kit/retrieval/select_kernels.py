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
Compiled on first use and cached beside this file, or in numba's user cache where that is read-only
(``cache=True``): about 11 s once per machine on 2 AMD EPYC cores, then about 0.3 s per process to load.

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
def _key(row, i, sh, low):
    """Entry ``i`` of ``row``, the bits of a float (int16 for bf16, int32 for float32; ``sh`` = bits - 1, ``low`` =
    2**sh - 1), as an int64 in the float's order."""
    b = np.int64(row[i])
    return b ^ ((b >> sh) & low)


@numba.njit(nogil=True, cache=True, inline="always")
def _kth_largest(u, count, kk, nbits, hist):
    """The kk-th largest of the non-negative ``nbits``-bit integers ``u[:count]`` (kk <= count), by radix selection:
    one 256-bin histogram per byte, most significant first, of the entries that share the bytes chosen so far
    (``nbits`` / 8 passes over ``u``; a partition would move the entries)."""
    prefix = np.int64(0)
    need = kk
    for level in range(nbits // 8):
        shift = nbits - 8 * (level + 1)
        hist[:] = 0
        for j in range(count):
            x = u[j]
            if (x >> (shift + 8)) == prefix:
                hist[(x >> shift) & 255] += 1
        d = 255
        while hist[d] < need:
            need -= hist[d]
            d -= 1
        prefix = (prefix << 8) | d
    return prefix


@numba.njit(nogil=True, cache=True)
def select_rows(bits, kk, block, sh, lo, hi, out):
    """The kk best columns of rows ``[lo, hi)`` of ``bits`` (a similarity matrix's bits, see :func:`_key`),
    written to ``out[r]`` best first, by value then increasing column. Exact, in two stages (the same argument as
    :func:`~simsiam_kit.retrieval.index.select_topk`): block j holds columns j, j + nb, ..., j + (block - 1) nb
    (nb = n // block; every column after nb x block is a block of its own); m = the kk-th largest block maximum;
    every entry of the row's top kk is >= m and lies in a block whose maximum is >= m; those entries are the
    candidates (at least kk of them), and their best kk, by value then column, are the row's.

    The block maxima of ``block`` 16 (the default) are one expression of 16 loads per block: written out, the
    compiler vectorises it over the blocks (a loop over the 16, or a helper function holding the expression, ran
    5-6x slower on AMD EPYC); other block sizes take a plain loop."""
    n = bits.shape[1]
    nb = n // block
    nblocks = nb + (n - nb * block)
    low = (1 << sh) - 1
    half = np.int64(1) << sh  # ordered key + half: the same order, non-negative (sh + 1 bits)
    bm = np.empty(nblocks, np.int64)
    kept = np.empty(nblocks, np.int64)
    cand = np.empty(n, np.uint64)
    hist = np.zeros(256, np.int64)
    tail0 = nb * block - nb  # column of tail block j (j >= nb): tail0 + j
    for r in range(lo, hi):
        row = bits[r]
        if block == 16:
            for j in range(nb):
                bm[j] = (
                    max(
                        max(
                            max(
                                max(_key(row, j, sh, low), _key(row, nb + j, sh, low)),
                                max(_key(row, 2 * nb + j, sh, low), _key(row, 3 * nb + j, sh, low)),
                            ),
                            max(
                                max(_key(row, 4 * nb + j, sh, low), _key(row, 5 * nb + j, sh, low)),
                                max(_key(row, 6 * nb + j, sh, low), _key(row, 7 * nb + j, sh, low)),
                            ),
                        ),
                        max(
                            max(
                                max(_key(row, 8 * nb + j, sh, low), _key(row, 9 * nb + j, sh, low)),
                                max(_key(row, 10 * nb + j, sh, low), _key(row, 11 * nb + j, sh, low)),
                            ),
                            max(
                                max(_key(row, 12 * nb + j, sh, low), _key(row, 13 * nb + j, sh, low)),
                                max(_key(row, 14 * nb + j, sh, low), _key(row, 15 * nb + j, sh, low)),
                            ),
                        ),
                    )
                    + half
                )
        else:
            for j in range(nb):
                bm[j] = _key(row, j, sh, low) + half
            for t in range(1, block):
                base = t * nb
                for j in range(nb):
                    bm[j] = max(bm[j], _key(row, base + j, sh, low) + half)
        for j in range(nb, nblocks):
            bm[j] = _key(row, tail0 + j, sh, low) + half
        m = _kth_largest(bm, nblocks, kk, sh + 1, hist)
        nk = 0
        for j in range(nblocks):  # the kept blocks, without a branch
            kept[nk] = j
            nk += bm[j] >= m
        c = 0
        for b in range(nk):
            j = kept[b]
            if j < nb:
                for t in range(block):
                    col = j + t * nb
                    v = _key(row, col, sh, low) + half
                    cand[c] = (np.uint64(v) << np.uint64(32)) | (_MASK32 - np.uint64(col))
                    c += v >= m
            else:
                col = tail0 + j
                cand[c] = (np.uint64(bm[j]) << np.uint64(32)) | (_MASK32 - np.uint64(col))
                c += 1
        top = cand[:c]
        if c > kk:
            top = np.partition(top, c - kk)[c - kk :]
        top = np.sort(top)
        for i in range(kk):
            out[r, i] = np.int64(_MASK32 - (top[kk - 1 - i] & _MASK32))


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def finish_rows(av, cols, qm, bank, q, keep, k, lo, hi, out_v, out_i):
    """The bf16 search's last step for rows ``[lo, hi)``: ``cols[r]`` are the k + m candidates, best bf16 first,
    ``av[r]`` their bf16 similarities (as float32) without the mean's share ``qm[r]``; the first ``keep`` stay with
    ``av + qm``; the rest (the band) are re-scored exactly (``bank[c] . q[r]`` in fp32, summed in the order the
    vectoriser chooses, as a BLAS would: ``reassoc``/``contract`` only, so signed zeros and NaNs keep their
    meaning) and the best k - keep of them by (score, then increasing id) fill the last places; the k are written
    to ``out_v[r]`` / ``out_i[r]`` in the order of ``order_ties``.

    The kept part arrives in that order already (bf16 descending, then increasing id) or nearly (``+ qm`` may round
    distinct bf16 values to one float32); the band's best follow, sorted; one insertion sort then costs the entries
    out of place, not a sort of k."""
    kc = cols.shape[1]
    band = kc - keep
    m = k - keep
    d = q.shape[1]
    vals = np.empty(k, np.float32)
    ids = np.empty(k, np.int64)
    keys = np.empty(k, np.int64)
    bvals = np.empty(max(band, 1), np.float32)
    bkeys = np.empty(max(band, 1), np.int64)
    zbits = np.empty(1, np.float32)
    zint = zbits.view(np.int32)
    for r in range(lo, hi):
        for i in range(keep):
            vals[i] = av[r, i] + qm[r]
            ids[i] = cols[r, i]
            zbits[0] = vals[i] + np.float32(0.0)  # -0.0 ranks as 0.0
            keys[i] = (_key(zint, 0, 31, 0x7FFFFFFF) << 31) | (_ID_MASK - ids[i])
        if band:
            for i in range(band):
                c = cols[r, keep + i]
                acc = np.float32(0.0)
                for x in range(d):
                    acc += bank[c, x] * q[r, x]
                bvals[i] = acc
                zbits[0] = acc + np.float32(0.0)
                bkeys[i] = (_key(zint, 0, 31, 0x7FFFFFFF) << 31) | (_ID_MASK - c)
            o = np.argsort(bkeys[:band])
            for i in range(m):
                j = o[band - 1 - i]
                vals[keep + i] = bvals[j]
                ids[keep + i] = cols[r, keep + j]
                keys[keep + i] = bkeys[j]
        for i in range(1, k):  # insertion sort, descending keys
            kv, vv, iv = keys[i], vals[i], ids[i]
            j = i - 1
            while j >= 0 and keys[j] < kv:
                keys[j + 1], vals[j + 1], ids[j + 1] = keys[j], vals[j], ids[j]
                j -= 1
            keys[j + 1], vals[j + 1], ids[j + 1] = kv, vv, iv
        for i in range(k):
            out_v[r, i] = vals[i]
            out_i[r, i] = ids[i]
