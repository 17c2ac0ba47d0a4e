"""Weighted kNN classification on l2-normalised features (InstDisc / DINO protocol): a consumer of
the index's neighbours.

Each query takes its k most similar bank features (cosine similarity s_i) and scores class c by
``sum_i exp(s_i / T) [y_i == c]``; the prediction is the arg-max (equal scores go to the lowest class
index). Several k and temperatures come from one search of depth max(k): the index returns
neighbours by decreasing similarity, equal similarities by increasing bank index (its tie rule), so
the k nearest are a prefix of the deeper list.

One object serves the pretraining kNN monitor and ``simsiam-kit eval knn`` (in the spirit of
solo-learn's ``WeightedKNNClassifier`` and lightly's ``knn_predict``)::

    knn = KNNClassifier(k=(20, 200), temperature=0.1)
    knn.update(train_features, train_labels)        # the bank; call again to append
    out = knn.compute(test_features, test_labels)   # one search, every (k, T)
    out.pred(200), out.accuracy[(200, 0.1)]["top1"]

:func:`knn_classify` is the same in one call, ``(pred, scores)``.

Where a change goes: the vote in :func:`weighted_vote`, accuracy in :func:`topk_accuracy`, the search
and its order in :mod:`simsiam_kit.retrieval.index`; protocol metrics on the neighbours (recall@K,
mAP@R, confusion matrix) and reports in ``evaluation/knn.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from simsiam_kit.config import DEFAULT_KNN_K, DEFAULT_KNN_TEMPERATURE
from simsiam_kit.errors import UserError
from simsiam_kit.retrieval.index import RERANK, EmbeddingIndex, check_k


def weighted_vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float):
    """Class scores (Q, C): sum over neighbours of exp(sim / T) one-hot(label)."""
    w = torch.exp(sims.float() / temperature)
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float32, device=sims.device)
    scores.scatter_add_(1, neighbour_labels.long(), w)
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """{"top1": %, "top5": %, ...}: share of rows whose label is among the k highest scores **and received
    votes** (a score above 0). The strict rule: with fewer than k classes among a query's neighbours, a
    class that got no vote is no prediction, so it never counts as a hit (DINO's ``eval_knn.py``,
    solo-learn's and lightly's kNN rank zero-score classes in ``sort`` order and count them; see
    docs/evaluation.md)."""
    out = {}
    for k in ks:
        k_ = min(k, scores.shape[1])
        values, top = scores.topk(k_, dim=1)
        hit = (top == labels.view(-1, 1)) & (values > 0)
        out[f"top{k}"] = 100.0 * hit.any(1).float().mean().item()
    return out


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def check_temperatures(temperature, name: str = "temperature") -> tuple:
    """The one check of kNN temperatures: each as a float without repeats, in order; raises unless all
    are positive (``name`` as for :func:`check_k`)."""
    temps = tuple(dict.fromkeys(float(t) for t in _tuple(temperature)))
    bad = [t for t in temps if not (math.isfinite(t) and t > 0)]  # NaN passes "<= 0": refused by name
    if not temps or bad:
        raise UserError(f"{name} must be positive and finite, got {bad[0] if bad else 'none'}")
    return temps


@dataclass(frozen=True)
class KNNResult:
    """What :meth:`KNNClassifier.compute` returns; tensors on the test features' device."""

    sims: torch.Tensor  # (Q, depth) similarities, descending; equal ones by increasing bank index
    ids: torch.Tensor  # (Q, depth) bank rows
    neighbour_labels: torch.Tensor  # (Q, depth)
    scores: dict  # (k, T) -> (Q, C) class scores
    accuracy: dict  # (k, T) -> {"top1": %, "top5": %}; empty without test labels
    ks: tuple  # as given: the first is the default of pred()
    temperatures: tuple
    backend: str

    @property
    def depth(self) -> int:
        return int(self.ids.shape[1])

    def pred(self, k: Optional[int] = None, temperature: Optional[float] = None) -> torch.Tensor:
        """Predicted classes (Q,) for one (k, T), by default the first of each."""
        key = (
            int(k if k is not None else self.ks[0]),
            float(temperature if temperature is not None else self.temperatures[0]),
        )
        return self.scores[key].argmax(1)


class KNNClassifier:
    """Weighted kNN classifier; see the module docstring.

    ``k``, ``temperature``: one value or several (every pair is scored from one search).
    ``num_classes``: default max label + 1 (bank and test labels). ``backend``, ``kind``, ``device``,
    ``rerank``: the :class:`~simsiam_kit.retrieval.index.EmbeddingIndex` settings (``device`` for the torch
    backend: default the GPU when torch sees one). ``normalize``: l2-normalise features here (off when
    they already are, as ``extract_features`` returns them). ``min_depth``: search at least this deep
    (retrieval metrics on the same search).
    """

    def __init__(
        self,
        k: Union[int, Sequence[int]] = DEFAULT_KNN_K,
        temperature: Union[float, Sequence[float]] = DEFAULT_KNN_TEMPERATURE,
        num_classes: Optional[int] = None,
        *,
        backend: str = "auto",
        kind: str = "flat",
        device=None,
        normalize: bool = True,
        min_depth: int = 0,
        rerank: int = RERANK,
    ):
        self.ks = check_k(k)
        self.temperatures = check_temperatures(temperature)
        self.num_classes = num_classes
        self.backend, self.kind, self.device = backend, kind, device
        self.normalize, self.min_depth, self.rerank = normalize, int(min_depth), rerank
        self.index: Optional[EmbeddingIndex] = None
        self._labels: list[torch.Tensor] = []

    def _features(self, x) -> torch.Tensor:
        x = torch.as_tensor(x)
        return F.normalize(x.float(), dim=1) if self.normalize else x

    @torch.no_grad()
    def update(self, train_features, train_labels) -> "KNNClassifier":
        """Add (N, D) features and their (N,) labels to the bank."""
        x = self._features(train_features)
        labels = torch.as_tensor(train_labels).long().flatten()
        if len(labels) != len(x):
            raise ValueError(f"{len(x)} bank features but {len(labels)} labels")
        if self.index is None:
            self.index = EmbeddingIndex(x.shape[1], self.kind, self.backend, device=self.device, rerank=self.rerank)
        self.index.add(x)
        self._labels.append(labels)
        return self

    @torch.no_grad()
    def compute(self, test_features, test_labels=None) -> KNNResult:
        """One search of the bank for every test feature; class scores for every (k, T), and top-1/top-5
        accuracy when ``test_labels`` are given."""
        index = self.index
        n = 0 if index is None else index.ntotal
        if index is None or n == 0:
            raise UserError("the kNN bank is empty")
        check_k(self.ks, n, pool=f"the kNN bank ({n} vectors)")
        q = self._features(test_features)
        sims, ids = index.search(q, min(n, max(max(self.ks), self.min_depth)))
        if len(self._labels) > 1:
            self._labels = [torch.cat([lab.cpu() for lab in self._labels])]
        bank_labels = self._labels[0]
        nbr = bank_labels.to(ids.device)[ids]
        num_classes = self.num_classes
        if not num_classes:
            top = int(bank_labels.max())
            if test_labels is not None and len(test_labels):
                top = max(top, int(torch.as_tensor(test_labels).max()))
            num_classes = top + 1
        scores = {
            (k, t): weighted_vote(sims[:, :k], nbr[:, :k], num_classes, t) for k in self.ks for t in self.temperatures
        }
        accuracy = {}
        if test_labels is not None:
            labels = torch.as_tensor(test_labels).to(sims.device)
            accuracy = {key: topk_accuracy(sc, labels, (1, 5)) for key, sc in scores.items()}
        return KNNResult(
            sims=sims,
            ids=ids,
            neighbour_labels=nbr,
            scores=scores,
            accuracy=accuracy,
            ks=self.ks,
            temperatures=self.temperatures,
            backend=index.backend,
        )


@torch.no_grad()
def knn_classify(
    bank,
    bank_labels,
    queries,
    k: int = DEFAULT_KNN_K,
    temperature: float = DEFAULT_KNN_TEMPERATURE,
    num_classes: Optional[int] = None,
):
    """Predicted labels (Q,) and class scores (Q, C) of ``queries`` in one call (lightly's
    ``knn_predict``): a :class:`KNNClassifier` with the exact torch search on the bank's device (where
    the pretraining monitor keeps its features). Features are l2-normalised here; k is capped at the
    bank size."""
    k = min(int(k), len(bank))
    out = (
        KNNClassifier(k, temperature, num_classes, backend="torch", device=bank.device)
        .update(bank, bank_labels)
        .compute(queries)
    )
    return out.pred(), out.scores[(k, float(temperature))]
