"""Weighted kNN classification on l2-normalised features (InstDisc / DINO protocol).

Each query takes its k most similar bank features (cosine similarity s_i) and scores class c by
sum_i exp(s_i / T) [y_i == c]; the prediction is the arg-max (ties go to the lowest class index).
Used by the pretraining kNN monitor and by ``simsiam-kit eval knn`` (which adds a FAISS backend).
"""

from __future__ import annotations

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
    v, i = torch.topk(sim, kk, dim=1)
    if kk > k:
        straddle = torch.nonzero(v[:, k] == v[:, k - 1]).flatten()
        v, i = v[:, :k].clone(), i[:, :k].clone()
        if straddle.numel():
            v[straddle], i[straddle] = _topk_lowest_index(sim[straddle], v[straddle, k - 1], k)
    # deterministic order among equal similarities: by bank index
    order = torch.argsort(i, dim=1, stable=True)
    v2, i2 = torch.gather(v, 1, order), torch.gather(i, 1, order)
    order = torch.argsort(-v2, dim=1, stable=True)
    return torch.gather(v2, 1, order), torch.gather(i2, 1, order)


def _topk_lowest_index(rows: torch.Tensor, kth: torch.Tensor, k: int):
    """Exact top-k of each row given its k-th value: everything above it, then the lowest-index
    columns equal to it (one vectorised pass; the result is in column order, sorted by the caller)."""
    kth = kth.view(-1, 1)
    above = rows > kth
    equal = rows == kth
    need = k - above.sum(1, keepdim=True)
    keep = above | (equal & (equal.cumsum(1) <= need))
    idx = torch.nonzero(keep)[:, 1].view(rows.shape[0], k)
    return torch.gather(rows, 1, idx), idx


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
