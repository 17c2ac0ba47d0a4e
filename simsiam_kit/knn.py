"""Old import path of :func:`simsiam_kit.retrieval.knn.knn_classify`, kept only while
``simsiam_kit/pretrain.py`` (the kNN monitor), ``benchmarks/reproduce/time_to_accuracy.py`` and
``benchmarks/gpu_check.py`` still import it from here. Nothing else belongs in this module: the kNN
code lives in :mod:`simsiam_kit.retrieval`; delete this file once those imports point there.
"""

from simsiam_kit.retrieval.knn import knn_classify

__all__ = ["knn_classify"]
