"""Atomic file writes: write to a temp file in the same directory, fsync, rename.

What a reader of the target path can see: the old file or the new one, never a part of the new one.
A write killed before its rename leaves a temp file named ``.<name>.<random>.tmp`` next to the target
(:data:`TEMP_RE`); :func:`remove_stale_temp_files` deletes them, and is only safe where no other
process writes (a run directory whose lock is held, see ``engine/run_dir.py``).

* The new file gets the mode a plain ``open(path, "w")`` would give it: the existing file's mode when
  it replaces one, else ``0666`` minus the umask (``mkstemp`` alone would give ``0600``).
* An ``OSError`` while writing (disk full, ``ulimit -f``, read-only or missing directory) becomes a
  :class:`UserError` naming the path; the old file is untouched and the temp file removed.
* Ctrl-C (SIGINT) during a write is deferred until the write is complete or undone, then raised as
  ``KeyboardInterrupt``: a write is never cut in the middle by the user's own interrupt.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from simsiam_kit.errors import UserError

TEMP_SUFFIX = ".tmp"
#: names of the temp files :func:`_atomic` creates: ``.`` + target name + ``.`` + mkstemp's 8 characters + ``.tmp``
TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(old)
    return old


def _new_file_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)  # replacing a file keeps its mode, like open("w")
    except OSError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def defer_sigint():
    """Hold back SIGINT (Ctrl-C) for the duration of the block, then deliver it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if pending:
            signal.raise_signal(signal.SIGINT)  # the restored handler runs: KeyboardInterrupt by default


def _os_error(e: BaseException):
    """The ``OSError`` behind ``e`` (torch.save reports a failed write as a RuntimeError whose context is it)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _atomic(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    with defer_sigint():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        except OSError as e:
            why = e.strerror or str(e)
            for parent in (path.parent, *path.parent.parents):
                if parent.exists():
                    if not parent.is_dir():
                        why = f"{parent} is not a directory"
                    break
            raise UserError(f"cannot write {path}: {why}") from None
        try:
            os.fchmod(fd, _new_file_mode(path))
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            ose = _os_error(e)
            if ose is not None:
                raise UserError(
                    f"cannot write {path}: {ose.strerror or ose}; the previous file, if any, is unchanged"
                ) from None
            raise


def remove_stale_temp_files(directory: Path) -> tuple[int, int]:
    """Delete the temp files killed atomic writes left in ``directory`` (not recursive).

    Returns (files removed, bytes freed). Call it only where no other process may be writing."""
    n = size = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0, 0
    for p in directory.iterdir():
        if TEMP_RE.match(p.name) and p.is_file() and not p.is_symlink():
            try:
                b = p.stat().st_size
                p.unlink()
            except FileNotFoundError:
                continue
            n, size = n + 1, size + b
    return n, size


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    _atomic(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data), "wb")
