"""Weighted kNN classification on l2-normalised features (InstDisc / DINO protocol).

Each query takes its k most similar bank features (cosine similarity s_i) and scores class c by
sum_i exp(s_i / T) [y_i == c]; the prediction is the arg-max (ties go to the lowest class index).
Used by the pretraining kNN monitor and by ``simsiam-kit eval knn`` (which adds a FAISS backend).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_search_torch(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 1024):
    """Exact inner-product top-k by chunked matmul: returns (similarities, indices), each (Q, k),
    sorted by decreasing similarity; equal similarities are ordered by increasing bank index."""
    k = min(k, bank.shape[0])
    sims, idxs = [], []
    bank_t = bank.t()  # a transposed view: the GEMM reads it in place (no copy of the bank per call)
    for s in range(0, queries.shape[0], chunk):
        sim = queries[s : s + chunk] @ bank_t
        v, i = _stable_topk(sim, k)
        sims.append(v)
        idxs.append(i)
    return torch.cat(sims), torch.cat(idxs)


def _stable_topk(sim: torch.Tensor, k: int):
    """Top-k of each row, similarities descending, equal similarities by increasing column index,
    including at the cut: when several columns tie with the k-th value, the lowest indices are kept
    (``torch.topk`` alone picks an arbitrary subset of them). Backends can then agree exactly."""
    n = sim.shape[1]
    kk = min(k + 1, n)  # one extra: a tie across the cut shows as v[k] == v[k-1]
    if sim.device.type == "cpu":
        v, i = _select_topk(sim, kk)
        return _fix_ties_numpy(sim, v, i, k)
    v, i = torch.topk(sim, kk, dim=1)
    redo = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    if kk > k:
        straddle = torch.nonzero(v[:, k] == v[:, k - 1]).flatten().tolist()
        v, i = v[:, :k].clone(), i[:, :k].clone()
        for r in straddle:  # few rows: one comparison pass over each
            kth = float(v[r, k - 1])  # a Python float: comparing with a 0-d tensor is ~200x slower
            above = v[r] > kth  # every column above the k-th value is already in the top-k+1
            n_above = int(above.sum())
            eq = torch.nonzero(sim[r] == kth).flatten()[: k - n_above]  # lowest indices first
            i[r] = torch.cat([i[r][above], eq])
            v[r, n_above:] = kth
            redo[r] = True  # sorted below
    # deterministic order among equal similarities (by bank index); only rows that hold a tie (or were
    # rebuilt at the cut) need it, which keeps two full argsorts off the common path
    tied = torch.nonzero(redo | (v[:, 1:] == v[:, :-1]).any(1)).flatten()
    if tied.numel():
        vt, it = v[tied], i[tied]
        order = torch.argsort(it, dim=1, stable=True)
        vt, it = torch.gather(vt, 1, order), torch.gather(it, 1, order)
        order = torch.argsort(-vt, dim=1, stable=True)
        v[tied], i[tied] = torch.gather(vt, 1, order), torch.gather(it, 1, order)
    return v, i


BLOCK = 16


def _select_topk(sim: torch.Tensor, kk: int, block: int = BLOCK):
    """``torch.topk(sim, kk, dim=1)`` (the same values; equal values at the cut may come from other
    columns, which the caller settles) in two exact stages, faster on the CPU for kk << columns
    (measured 58 vs 74 ms for 1,024 x 45,000 at kk=201 on 2 cores):

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
    head = sim.as_strided((rows, block, nb), (sim.stride(0), nb * sim.stride(1), sim.stride(1)))
    bmax = head.amax(1)  # (rows, nb)
    ib = torch.topk(bmax, kk, dim=1, sorted=False).indices
    cols = (ib.unsqueeze(1) + torch.arange(0, block * nb, nb).view(1, block, 1)).view(rows, -1)
    if n > nb * block:
        cols = torch.cat([cols, torch.arange(nb * block, n).expand(rows, -1)], 1)
    v, j = torch.topk(torch.gather(sim, 1, cols), kk, dim=1)
    return v, torch.gather(cols, 1, j)


def _fix_ties_numpy(sim: torch.Tensor, v: torch.Tensor, i: torch.Tensor, k: int):
    """CPU version of the tie handling of :func:`_stable_topk`, in single-threaded numpy. The work is
    small (Q x k), and on a busy 2-core machine small multi-threaded torch ops stall on the OpenMP
    barrier (measured 10-40 ms for a 45,000-element compare + nonzero, vs 0.05 ms single-threaded)."""
    v, i = v.numpy(), i.numpy()
    redo = np.zeros(len(v), dtype=bool)
    if v.shape[1] > k:
        straddle = np.flatnonzero(v[:, k] == v[:, k - 1])
        v, i = v[:, :k].copy(), i[:, :k].copy()
        for r in straddle:  # few rows: one comparison pass over each
            kth = v[r, k - 1]
            above = v[r] > kth  # every column above the k-th value is already in the top k+1
            n_above = int(above.sum())
            eq = np.flatnonzero(sim[r].numpy() == kth)[: k - n_above]  # lowest indices first
            i[r] = np.concatenate([i[r][above], eq])
            v[r, n_above:] = kth
        redo[straddle] = True  # rebuilt rows are sorted below
    # deterministic order among equal similarities (by bank index): only rows holding a tie need it
    tied = np.flatnonzero(redo | (v[:, 1:] == v[:, :-1]).any(1))
    if len(tied):
        o = np.lexsort((i[tied], -v[tied]), axis=-1)
        v[tied] = np.take_along_axis(v[tied], o, -1)
        i[tied] = np.take_along_axis(i[tied], o, -1)
    return torch.from_numpy(v), torch.from_numpy(i)


def weighted_vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float):
    """Class scores (Q, C): sum over neighbours of exp(sim / T) one-hot(label)."""
    w = torch.exp(sims.float() / temperature)
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float32, device=sims.device)
    scores.scatter_add_(1, neighbour_labels.long(), w)
    return scores


@torch.no_grad()
def knn_classify(bank, bank_labels, queries, k: int = 200, temperature: float = 0.1, num_classes: int | None = None):
    """Predicted labels and class scores for ``queries`` (features are l2-normalised here)."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    num_classes = num_classes or int(bank_labels.max()) + 1
    sims, idx = knn_search_torch(bank, queries, k)
    scores = weighted_vote(sims, bank_labels[idx], num_classes, temperature)
    return scores.argmax(1), scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    out = {}
    for k in ks:
        k_ = min(k, scores.shape[1])
        top = scores.topk(k_, dim=1).indices
        out[f"top{k}"] = 100.0 * (top == labels.view(-1, 1)).any(1).float().mean().item()
    return out
