"""The layout of a pretraining run directory, stated once.

::

    RUN/config.yaml            resolved config (written once, never changed; see config.amendments.yaml)
    RUN/config.amendments.yaml changes accepted on --resume (optim.epochs, logging keys), in order
    RUN/.lock                  held (flock) by the process that trains in this directory
    RUN/checkpoints/last.pt    full checkpoint (named objects: model, optimizer, scaler, RNG; trainer state)
    RUN/backbone.pt            backbone state dict (no prefixes) + arch/stem/normalisation metadata
    RUN/metrics.jsonl          one JSON object per line (step and epoch records)
    RUN/plots/*.png            loss, std, kNN accuracy, lr
    RUN/results/pretrain.json  final summary (loss, std, kNN top-1 vs random init, throughput)
    RUN/eval/<kind>/           evaluations of this run (knn, linear, detection)

Every command that reads or writes a run directory goes through :class:`RunDir`.

One process at a time trains in a run directory: :meth:`RunDir.lock` takes an exclusive ``flock`` on
``RUN/.lock`` and holds it until the process exits or dies (the kernel releases it then, so a crashed
run never leaves a stale lock to clear by hand). Under DDP rank 0 holds it for the job. The lock is
:class:`simsiam_kit.utils.dirlock.DirLock` (the lock file is opened without following links and must be a
regular file with one name: a directory received from someone else whose ``.lock`` leads elsewhere is refused
before anything is written).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Union

from simsiam_kit.utils.dirlock import LOCK_NAME, DirLock
from simsiam_kit.utils.io import remove_stale_temp_files


class RunDir:
    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        self._lock = DirLock(self.root, "another simsiam-kit run is using this directory", "a run directory")

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __str__(self) -> str:
        return str(self.root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def amendments(self) -> Path:
        return self.root / "config.amendments.yaml"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_NAME

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

    def run_files(self) -> list[Path]:
        """Everything ``simsiam-kit pretrain`` writes here (what ``--overwrite`` replaces)."""
        return [
            self.config,
            self.amendments,
            self.checkpoints,
            self.backbone,
            self.metrics,
            self.plots,
            self.results,
            self.root / "eval",
            self.root / "tensorboard",  # engine/loggers.py's TensorBoard sink
        ]

    def is_empty(self) -> bool:
        """No entries but the lock file (a directory that does not exist is empty)."""
        if not self.root.exists():
            return True
        return all(p.name == LOCK_NAME for p in self.root.iterdir())

    # -- the lock ----------------------------------------------------------------------------

    def lock(self) -> "RunDir":
        """Create the directory if needed and take its lock for the life of this process.

        Raises :class:`UserError` naming the directory when another live process holds it."""
        self._lock.acquire()
        return self

    def unlock(self) -> None:
        self._lock.release()

    @property
    def locked(self) -> bool:
        return self._lock.locked

    def remove_stale_temp_files(self) -> tuple[int, int]:
        """Delete temp files of killed atomic writes (checkpoint, backbone, config, metrics, results).
        Only with the lock held: otherwise they may belong to a live writer. Returns (files, bytes)."""
        if not self.locked:
            raise RuntimeError("remove_stale_temp_files needs the run directory's lock")
        n = size = 0
        for d in (self.root, self.checkpoints, self.results, self.plots):
            a, b = remove_stale_temp_files(d)
            n, size = n + a, size + b
        return n, size

    def remove_run_files(self) -> None:
        """Delete what a previous run wrote here (``--overwrite``); other files are left alone."""
        if not self.locked:
            raise RuntimeError("remove_run_files needs the run directory's lock")
        for p in self.run_files():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
