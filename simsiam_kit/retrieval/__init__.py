"""Retrieval, the core's search layer: the index (the only code that searches, and its tie rule), the
weighted kNN classifier built on it, and the embed/search application.

* :mod:`simsiam_kit.retrieval.index`: ``EmbeddingIndex`` (torch and faiss backends; flat, IVF, HNSW),
  ``settle_ties`` (neighbour order: similarity descending, equal similarities by increasing index);
* :mod:`simsiam_kit.retrieval.knn`: ``KNNClassifier`` (``update`` / ``compute``: several k and
  temperatures from one search), ``knn_classify`` (the same in one call), ``weighted_vote``,
  ``topk_accuracy``; used by the pretraining kNN monitor and ``eval knn``;
* :mod:`simsiam_kit.retrieval.embed_search`: embedding directories and image search for
  ``simsiam-kit embed`` / ``search``, with the model runtime passed in (an ``Embedder``).

The core layer: imports only the core (never ``evaluation`` or ``export``).
"""

from simsiam_kit.retrieval.index import BACKENDS, KINDS, EmbeddingIndex, settle_ties
from simsiam_kit.retrieval.knn import KNNClassifier, KNNResult, knn_classify, topk_accuracy, weighted_vote

__all__ = [
    "BACKENDS",
    "KINDS",
    "EmbeddingIndex",
    "settle_ties",
    "KNNClassifier",
    "KNNResult",
    "knn_classify",
    "topk_accuracy",
    "weighted_vote",
]
