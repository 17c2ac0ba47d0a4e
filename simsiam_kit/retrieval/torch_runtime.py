"""The torch encoder as an embedding runtime (``simsiam-kit embed --runtime torch`` with ``--weights``, and the
``torch-bf16`` runtime of an exported model's source weights, :mod:`simsiam_kit.export.runtime_choice`).

:class:`TorchEmbedder` has what the streaming pipeline asks of a runtime (``preprocess``, ``run``, ``chunk``,
``embed``, ``dim``, ``meta``, ``path``, ``provider``): the encoder module runs under ``torch.no_grad`` with the
precision the project picks for the device (:func:`simsiam_kit.utils.device.resolve_precision` ``auto``: bf16 on
CUDA and on CPUs with AVX512-BF16 / AMX, else fp32) and channels_last where that pays
(:func:`~simsiam_kit.utils.device.resolve_channels_last`). Its preprocessing is given, not written here: the
command layer passes the exported model's rule (``export.embedder.preprocess`` with the encoder's image size,
mean and std), so a torch-embedded directory and an ONNX-embedded one see the same pixels. bf16 embeddings
differ from fp32 ones in the third decimal; the runtime and precision are recorded in the fingerprint, so
``--resume`` never mixes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from simsiam_kit.errors import UserError
from simsiam_kit.utils.vectors import check_finite_embeddings


class TorchEmbedder:
    def __init__(
        self,
        module,
        meta: dict,
        path,
        preprocess: Callable,
        batch_size: int = 64,
        device: str = "auto",
        precision: str = "auto",
        source: Optional[str] = None,
    ):
        import torch

        from simsiam_kit.utils.device import resolve_channels_last, resolve_device, resolve_precision

        if batch_size < 1:
            raise UserError(f"batch size must be >= 1 (got {batch_size})")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = resolve_channels_last(None, self.device, self.precision)
        self.module = module.eval().to(self.device)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.meta = {**meta, "precision": self.precision.name}
        self.dim = int(meta["embedding_dim"])
        self.path = Path(path)
        self.preprocess = preprocess
        self.batch_size = self.chunk = int(batch_size)
        self.source = source  # the weights file, when ``path`` is the model they were exported to
        self.normalize = True
        self.runtime = f"torch-{self.precision.name}{'-channels_last' if self.channels_last else ''}"
        self.provider = (
            f"torch {self.device.type} {self.precision.name}{' + channels_last' if self.channels_last else ''}"
        )

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw encoder output (float32 (N, D)) of a preprocessed float32 (N, 3, S, S) batch."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.device.type == "cuda":  # the pipeline's loader pins batches already on CUDA
            t = (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self.precision.autocast():
            z = self.module(t)
        z = z.float().cpu().numpy()
        if z.shape != (len(x), self.dim):
            raise UserError(f"{self.path}: the encoder gives shape {z.shape} for {len(x)} images, not (N, {self.dim})")
        what = f"{self.path} ({self.runtime})"
        if self.source:  # the torch-bf16 runtime of an exported model: its weights are what computed this
            what = f"{self.source} ({self.runtime} runtime of {self.path})"
        return check_finite_embeddings(z, what)

    def embed(self, images, normalize: Optional[bool] = None) -> np.ndarray:
        """float32 (N, D) embeddings of one image or a batch (what ``preprocess`` takes), l2-normalised unless
        ``normalize`` (default :attr:`normalize`) is False."""
        from simsiam_kit.utils.vectors import l2_normalize

        x = self.preprocess(images)
        z = np.concatenate([self.run(x[s : s + self.chunk]) for s in range(0, len(x), self.chunk)])
        return l2_normalize(z) if (self.normalize if normalize is None else normalize) else z
