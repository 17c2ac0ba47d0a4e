"""Embedding rows in numpy, the one rule every runtime (onnxruntime, torch) and the embed pipeline share; no torch
import, so ``export.embedder`` stays light."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length, float32 (a zero row stays zero)."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32)
