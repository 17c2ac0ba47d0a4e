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
run never leaves a stale lock to clear by hand). Under DDP rank 0 holds it for the job. The lock file is
opened without following links and must be a regular file with one name: a directory received from
someone else whose ``.lock`` leads elsewhere is refused before anything is written.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path
from typing import Optional, Union

from simsiam_kit.errors import UserError
from simsiam_kit.utils.io import remove_stale_temp_files

LOCK_NAME = ".lock"
_HELD: set = set()  # lock descriptors of this process


def _close_inherited_locks() -> None:
    # A forked child (a DataLoader worker) shares the lock; were it to keep it, the lock would outlive
    # the training process by the worker's few seconds of orphan life. Only the locking process holds it.
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class RunDir:
    def __init__(self, root: Union[str, Path], what: str = "a run directory"):
        self.root = Path(root)
        self.what = what  # for messages: "a run directory", "an evaluation's output directory"
        self._lock_fd: Optional[int] = None

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
        import fcntl

        if self._lock_fd is not None:
            return self
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root}: exists and is not a directory")
        for _ in range(3):
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                fd = _open_lock_file(self.lock_file)
            except UserError:
                raise
            except OSError as e:
                where = f" ({e.filename})" if e.filename and str(e.filename) != str(self.root) else ""
                raise UserError(f"cannot use {self.root} as {self.what}: {e.strerror or e}{where}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                pid = f" (pid {holder})" if holder else ""
                raise UserError(
                    f"{self.root}: another simsiam-kit run is using this directory{pid}; "
                    "wait for it or pick another output directory"
                ) from None
            # the file we locked must still be the one at the path (not unlinked and re-created meanwhile)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._lock_fd = fd
                _HELD.add(fd)
                return self
            os.close(fd)
        raise UserError(f"{self.root}: could not lock {self.lock_file} (it keeps being replaced)")

    def unlock(self) -> None:
        if self._lock_fd is not None:
            _HELD.discard(self._lock_fd)
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

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


def _open_lock_file(path: Path) -> int:
    """Open (creating it) the lock file without following a link, and only if it is a regular file of one
    name. A run directory may come from someone else: a ``.lock`` that is a symbolic link, a hard link
    (more than one name) or a device would make the pid written into it land in some other file."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise UserError(f"{path}: {kind}; a run's lock file must be a regular file (remove it and try again)")
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:  # replaced by a link between the check and the open
            raise UserError(
                f"{path}: a symbolic link; a run's lock file must be a regular file (remove it and try again)"
            ) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        kind = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} names (hard link)"
        raise UserError(f"{path}: {kind}; a run's lock file must be a regular file (remove it and try again)")
    os.set_blocking(fd, True)
    return fd


def _read_pid(fd: int) -> Optional[int]:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
