"""Embedding rows in numpy, the one rule every runtime (onnxruntime, torch) and the embed pipeline share; no torch
import, so ``export.embedder`` stays light."""

from __future__ import annotations

import numpy as np

from simsiam_kit.errors import UserError


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length, float32 (a zero row stays zero)."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32)


def check_finite_embeddings(z: np.ndarray, what: str) -> np.ndarray:
    """``z`` when every value is finite; else a :class:`UserError` (``what``: the model and output) instead of
    NaN embeddings that would make a NaN index and meaningless neighbours. Every runtime's raw output passes it."""
    ok = np.isfinite(z).all(axis=1) if z.ndim == 2 else np.isfinite(z)
    if not np.all(ok):
        bad = np.flatnonzero(~ok)
        raise UserError(
            f"{what} is not finite (NaN or inf) for {len(bad)} of {len(z)} images (first: image {int(bad[0])} of "
            "the batch); refused: a NaN embedding makes a NaN index"
        )
    return z
