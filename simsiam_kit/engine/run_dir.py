"""The layout of a pretraining run directory, stated once.

::

    RUN/config.yaml            resolved config (never changed during the run)
    RUN/checkpoints/last.pt    full checkpoint (named objects: model, optimizer, scaler, RNG; trainer state)
    RUN/backbone.pt            backbone state dict (no prefixes) + arch/stem/normalisation metadata
    RUN/metrics.jsonl          one JSON object per line (step and epoch records)
    RUN/plots/*.png            loss, std, kNN accuracy, lr
    RUN/results/pretrain.json  final summary (loss, std, kNN top-1 vs random init, throughput)
    RUN/eval/<kind>/           evaluations of this run (knn, linear, detection)

Every command that reads or writes a run directory goes through :class:`RunDir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union


class RunDir:
    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __str__(self) -> str:
        return str(self.root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def backbone(self) -> Path:
        return self.root / "backbone.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def eval_dir(self, kind: str) -> Path:
        return self.root / "eval" / kind

    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file()

    def is_run(self) -> bool:
        """A directory written by ``simsiam-kit pretrain`` (it has a config and weights)."""
        return self.config.is_file() and (self.backbone.is_file() or self.checkpoint.is_file())
