"""One process at a time in a directory: an exclusive ``flock`` on ``DIR/.lock`` (a pretraining run directory,
:class:`simsiam_kit.engine.run_dir.RunDir`; an embedding directory, embed's shard writer and ``index build``;
an evaluation's output directory, ``simsiam_kit.evaluation.common.writing_output``).

The lock is held until the process releases it, exits or dies (the kernel releases it then, so a crashed or
SIGKILLed process never leaves a stale lock to clear by hand); its pid is written into the file, so a refused
second process is told who holds it. The lock file is opened without following links and must be a regular
file with one name: a directory received from someone else whose ``.lock`` is a symbolic link, a hard link or
a device would make the pid land in some other file, and is refused before anything is written. A forked child
(a DataLoader worker) closes its inherited copy at fork: only the locking process holds the lock. Readers ask
:func:`lock_holder` who holds it, without touching it (``eval`` notes a run still training; ``search`` refuses an
embedding directory being written).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Optional, Union

from simsiam_kit.errors import UserError

LOCK_NAME = ".lock"
_HELD: set = set()  # lock descriptors of this process


def _close_inherited_locks() -> None:
    # A forked child shares the lock; were it to keep it, the lock would outlive the locking process by the
    # child's few seconds of orphan life.
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def open_lock_file(path: Path, owner: str = "run") -> int:
    """Open (creating it) the lock file without following a link, and only if it is a regular file of one
    name; otherwise a :class:`UserError` naming it ("a ``owner``'s lock file must be a regular file")."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    fix = f"a {owner}'s lock file must be a regular file (remove it and try again)"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise UserError(f"{path}: {kind}; {fix}")
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:  # replaced by a link between the check and the open
            raise UserError(f"{path}: a symbolic link; {fix}") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        kind = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} names (hard link)"
        raise UserError(f"{path}: {kind}; {fix}")
    os.set_blocking(fd, True)
    return fd


def read_pid(fd: int) -> Optional[int]:
    """The pid written in a lock file (None when it holds none)."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def lock_holder(root: Union[str, Path]) -> Optional[int]:
    """The pid of the live process that holds ``root``'s lock (a run still training, an embed writing), 0 when
    it is held by a process whose pid cannot be told, None when nobody holds it. A reader's look: read from
    ``/proc/locks`` (the lock is not touched); elsewhere a shared, non-blocking probe of the lock."""
    lock = Path(root) / LOCK_NAME
    try:
        st = os.stat(lock)
    except OSError:
        return None
    try:
        with open("/proc/locks") as f:
            table = f.read().splitlines()
    except OSError:
        table = None
    if table is not None:
        want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        for line in table:
            parts = line.split()
            if len(parts) < 6 or "FLOCK" not in parts or "->" in parts:
                continue
            try:
                pid = int(parts[4])
                major, minor, ino = parts[5].split(":")
                if (int(major, 16), int(minor, 16), int(ino)) == want:
                    return pid
            except ValueError:
                continue
        return None
    import fcntl

    try:  # never through a link, and a FIFO must not block the probe
        fd = os.open(lock, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return int(os.pread(fd, 32, 0).decode().strip() or 0)
        except (OSError, ValueError):
            return 0
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class DirLock:
    """The lock of directory ``root``. ``busy``: what a refused process is told is going on ("another
    simsiam-kit run is using this directory"); ``purpose``: what the directory is for ("a run directory"),
    in the error when it cannot be created; ``owner``: whose lock file it is, in the error for a bad one."""

    def __init__(self, root: Union[str, Path], busy: str, purpose: str, owner: str = "run"):
        self.root, self.busy, self.purpose, self.owner = Path(root), busy, purpose, owner
        self._fd: Optional[int] = None

    @property
    def path(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "DirLock":
        """Create the directory if needed and take its lock (again: a no-op); a :class:`UserError` naming the
        directory when another live process holds it."""
        import fcntl

        if self._fd is not None:
            return self
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root}: exists and is not a directory")
        for _ in range(3):
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                fd = open_lock_file(self.path, self.owner)
            except UserError:
                raise
            except OSError as e:
                where = f" ({e.filename})" if e.filename and str(e.filename) != str(self.root) else ""
                raise UserError(f"cannot use {self.root} as {self.purpose}: {e.strerror or e}{where}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_pid(fd)
                os.close(fd)
                pid = f" (pid {holder})" if holder else ""
                raise UserError(
                    f"{self.root}: {self.busy}{pid}; wait for it or pick another output directory"
                ) from None
            # the file we locked must still be the one at the path (not unlinked and re-created meanwhile)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                _HELD.add(fd)
                return self
            os.close(fd)
        raise UserError(f"{self.root}: could not lock {self.path} (it keeps being replaced)")

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
