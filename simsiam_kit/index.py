"""Nearest-neighbour index over l2-normalised embeddings (inner product = cosine similarity).

One class serves the kNN evaluation (``simsiam-kit eval knn``) and embedding search
(``simsiam-kit embed`` / ``search``). Backends:

* ``faiss``: ``IndexFlatIP`` (exact), ``IndexIVFFlat`` (``kind="ivf"``) or ``IndexHNSWFlat``
  (``kind="hnsw"``); moved to the GPU when faiss-gpu sees one. faiss is imported lazily.
* ``torch``: exact chunked matmul + top-k (:func:`simsiam_kit.knn.knn_search_torch`), on the GPU
  when torch sees one (``use_gpu`` decides), else on the CPU.
* ``auto`` (a fixed, documented rule, backed by ``benchmarks/knn_eval.py``):

  - ``ivf`` / ``hnsw``: faiss (torch has no approximate index);
  - ``flat`` with faiss-gpu and a visible GPU: faiss on the GPU;
  - ``flat`` otherwise: torch (on the GPU when CUDA is available). On the reference CPUs
    (2 cores, MKL sgemm) a chunked torch matmul + top-k beats faiss-cpu's ``IndexFlatIP`` search at
    k=200 (see ``benchmarks/results/knn_eval.json``), and a CUDA torch matmul beats faiss-cpu by
    far when faiss has no GPU support.

Exact backends return the same neighbours: similarities descending, equal similarities ordered by
increasing index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from simsiam_kit.errors import UserError, require_extra

KINDS = ("flat", "ivf", "hnsw")
BACKENDS = ("auto", "faiss", "torch")


def faiss_has_gpu(faiss) -> bool:
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


class EmbeddingIndex:
    def __init__(self, dim: int, kind: str = "flat", backend: str = "auto", nlist: int = 0, nprobe: int = 16,
                 hnsw_m: int = 32, use_gpu: Optional[bool] = None):
        if kind not in KINDS:
            raise UserError(f"unknown index kind '{kind}' (available: {', '.join(KINDS)})")
        if backend not in BACKENDS:
            raise UserError(f"unknown kNN backend '{backend}' (available: {', '.join(BACKENDS)})")
        if kind != "flat" and backend == "torch":
            raise UserError(f"index kind '{kind}' needs the faiss backend (torch does exact search only)")
        self.dim, self.kind, self.nlist, self.nprobe, self.hnsw_m = int(dim), kind, nlist, nprobe, hnsw_m
        self.use_gpu = use_gpu
        self.backend = self.auto_backend(kind, use_gpu) if backend == "auto" else backend
        cuda = torch.cuda.is_available() and use_gpu is not False
        self.device = torch.device("cuda" if self.backend == "torch" and cuda else "cpu")
        self._vectors: list[np.ndarray] = []  # torch backend storage
        self._bank: Optional[torch.Tensor] = None
        self._faiss = None
        self._xb = None  # stored vectors, reconstructed only to settle ties at the cut (faiss flat)

    @staticmethod
    def auto_backend(kind: str, use_gpu: Optional[bool] = None) -> str:
        """The ``auto`` rule of the module docstring."""
        if kind != "flat":
            return "faiss"
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
            return sum(len(v) for v in self._vectors)
        return 0 if self._faiss is None else int(self._faiss.ntotal)

    def _check(self, x) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(f"embedding dimension mismatch: index has dim {self.dim}, got array of shape {x.shape}")
        return x

    def _make_faiss(self, train: Optional[np.ndarray]):
        faiss = require_extra("faiss", "cpu")
        if self.kind == "flat":
            idx = faiss.IndexFlatIP(self.dim)
        elif self.kind == "hnsw":
            idx = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
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
        return idx

    def add(self, x) -> "EmbeddingIndex":
        x = self._check(x)
        if self.backend == "torch":
            self._vectors.append(x)
            self._bank = None
        else:
            if self._faiss is None:
                self._faiss = self._make_faiss(x)
            self._faiss.add(x)
        return self

    # ---------------------------------------------------------------- search
    def search(self, queries, k: int):
        """(similarities float32 (Q,k), ids int64 (Q,k)) of the k nearest stored vectors."""
        q = self._check(queries)
        n = self.ntotal
        if n == 0:
            raise UserError("the index is empty")
        if k > n:
            raise UserError(f"k={k} is larger than the number of indexed vectors ({n})")
        if self.backend == "torch":
            from simsiam_kit.knn import knn_search_torch

            if self._bank is None:
                vecs = self._vectors[0] if len(self._vectors) == 1 else np.concatenate(self._vectors)
                self._bank = torch.from_numpy(vecs).to(self.device)  # no copy of a single added array on the CPU
            s, i = knn_search_torch(self._bank, torch.from_numpy(q).to(self.device), k)
            return s.cpu().numpy().astype(np.float32), i.cpu().numpy().astype(np.int64)
        if self.kind != "flat":
            s, i = self._faiss.search(q, k)
            return s.astype(np.float32), i.astype(np.int64)
        kk = min(k + 1, n)  # one extra: a tie across the cut shows as s[k] == s[k-1]
        s, i = self._faiss.search(q, kk)
        if kk > k:
            straddle = np.flatnonzero(s[:, k] == s[:, k - 1])
            s, i = s[:, :k].copy(), i[:, :k].copy()
            for r in straddle:
                s[r], i[r] = self._faiss_row_lowest_index(q[r : r + 1], s[r, k - 1], k)
            self._xb = None
        s, i = _tie_order(s, i)
        return s.astype(np.float32), i.astype(np.int64)

    def _faiss_row_lowest_index(self, q: np.ndarray, kth: float, k: int):
        """Rows where the k-th similarity ties across the cut: rescored against the stored vectors
        (float64, rounded to float32), and the k best kept with ties going to the lowest ids, as the
        torch backend does. (A faiss re-search cannot do this: its kernel, and so the last bit of a
        similarity, depends on the number of queries.)"""
        if getattr(self, "_xb", None) is None or len(self._xb) != self.ntotal:
            self._xb = self._faiss.reconstruct_n(0, self.ntotal).astype(np.float64)
        row = (self._xb @ q[0].astype(np.float64)).astype(np.float32)
        o = np.lexsort((np.arange(len(row)), -row))[:k]
        return row[o], o

    # ---------------------------------------------------------------- persistence
    def save(self, directory) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"dim": self.dim, "kind": self.kind, "backend": self.backend, "nlist": self.nlist,
                "nprobe": self.nprobe, "hnsw_m": self.hnsw_m, "ntotal": self.ntotal}
        if self.backend == "torch":
            np.save(d / "index_vectors.npy", np.concatenate(self._vectors) if self._vectors else
                    np.zeros((0, self.dim), np.float32))
        else:
            faiss = require_extra("faiss", "cpu")
            idx = self._faiss
            if hasattr(faiss, "index_gpu_to_cpu") and type(idx).__name__.startswith("Gpu"):
                idx = faiss.index_gpu_to_cpu(idx)
            faiss.write_index(idx, str(d / "index.faiss"))
        (d / "index.json").write_text(json.dumps(meta, indent=2))
        return d

    @classmethod
    def load(cls, directory, use_gpu: Optional[bool] = None) -> "EmbeddingIndex":
        d = Path(directory)
        meta_p = d / "index.json"
        if not meta_p.is_file():
            raise UserError(f"{d}: no index.json, not a saved index")
        try:
            meta = json.loads(meta_p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{meta_p}: invalid JSON ({e})") from None
        self = cls(meta["dim"], meta["kind"], meta["backend"], meta["nlist"], meta["nprobe"], meta["hnsw_m"], use_gpu)
        if self.backend == "torch":
            vec = np.load(d / "index_vectors.npy")
            if len(vec):
                self.add(vec)
        else:
            faiss = require_extra("faiss", "cpu")
            try:
                idx = faiss.read_index(str(d / "index.faiss"))
            except Exception as e:
                raise UserError(f"{d / 'index.faiss'}: cannot read FAISS index ({e})") from None
            if (use_gpu if use_gpu is not None else True) and self.kind != "hnsw" and faiss_has_gpu(faiss):
                self._gpu_res = faiss.StandardGpuResources()
                idx = faiss.index_cpu_to_gpu(self._gpu_res, 0, idx)
            self._faiss = idx
        return self


def _tie_order(s: np.ndarray, i: np.ndarray):
    """Order equal similarities by increasing id (matches the torch backend)."""
    o = np.lexsort((i, -s), axis=-1)
    return np.take_along_axis(s, o, -1), np.take_along_axis(i, o, -1)
