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
* JSON is written strictly (:func:`atomic_write_json`): a NaN or infinity is a :class:`UserError` naming
  the file and the key, never a ``NaN``/``Infinity`` token that other JSON readers reject.

Reading a file that may come from someone else goes through :func:`open_regular` /
:func:`read_bytes_bounded`: only a regular file is read (a link to ``/dev/zero``, a FIFO or a device
would never end or never start), and never more than a stated number of bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

from simsiam_kit.errors import UserError

TEMP_SUFFIX = ".tmp"
#: names of the temp files :func:`atomic_write` creates: ``.`` + target name + ``.`` + mkstemp's 8 characters + ``.tmp``
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


def os_error_behind(e: Optional[BaseException]) -> Optional[OSError]:
    """The ``OSError`` behind ``e`` (torch.save reports a failed write as a RuntimeError whose context is it)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


@contextlib.contextmanager
def atomic_stream(path: Path, mode: str = "wb"):
    """A file written in pieces (``with atomic_stream(p) as f: f.write(...)``), then fsynced and renamed over
    ``path``: a temp file next to it until then (removed on an error; :func:`remove_stale_temp_files` removes
    one a killed process left). A failed write is one :class:`UserError` naming ``path``."""
    path = Path(path)
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
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        ose = os_error_behind(e)
        if ose is not None:
            why = ose.strerror or str(ose)
            if ose.errno is None and "written" in why:  # numpy's short write ("N requested and M written")
                why = f"File too large or disk full ({why})"
            raise UserError(f"cannot write {path}: {why}; the previous file, if any, is unchanged") from None
        raise


def atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """The one atomic writer (over :func:`atomic_stream`): ``write(f)`` fills a temp file beside ``path``
    (opened with ``mode``, given the mode the target has or a new file would get), which is flushed,
    fsynced and renamed over ``path``; SIGINT waits until it is done. A failed write removes the temp file,
    leaves the old ``path`` as it was and is a :class:`UserError` naming the file (an ``OSError``); any
    other exception passes through. Every ``atomic_write_*`` below calls it by this module's name, which
    the fault tests replace."""
    with defer_sigint(), atomic_stream(path, mode) as f:
        write(f)


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
    atomic_write(path, lambda f: f.write(text), "w")


def _nonfinite_key(obj: Any, where: str = "") -> Optional[tuple[str, float]]:
    """The first place in ``obj`` holding a NaN or an infinity, as ``key.sub[3]``, and its value."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "<top>", obj
    if isinstance(obj, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for w, v in items:
        found = _nonfinite_key(v, w)
        if found:
            return found
    return None


def atomic_write_json(path: Path, obj: Any) -> None:
    """``obj`` as strict JSON (RFC 8259: no ``NaN``/``Infinity`` tokens); a non-finite number is a
    :class:`UserError` naming the file and its key, and nothing is written."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError:
        found = _nonfinite_key(obj)
        if found is None:
            raise
        key, value = found
        raise UserError(
            f"cannot write {path}: '{key}' is {value!r}, which JSON cannot hold (a result must be a finite number)"
        ) from None
    atomic_write_text(path, text + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), "wb")


def atomic_save_npy(path: Path, array) -> None:
    """``np.save(path, array)``, atomically (a full disk is one line naming ``path``)."""
    import numpy as np

    atomic_write(path, lambda f: np.save(f, array), "wb")


def atomic_savefig(fig, path: Path, **kw) -> None:
    """``fig.savefig(path)`` as a PNG, atomically (a full disk is one line naming ``path``)."""
    kw.setdefault("format", "png")
    atomic_write(path, lambda f: fig.savefig(f, **kw), "wb")


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` (a log such as ``metrics.jsonl``); a failed write (a full disk) is a
    :class:`UserError` naming ``path``."""
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


# --------------------------------------------------------------------------------------------- reading


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, what: str = "") -> BinaryIO:
    """``open(path, "rb")`` for a file that may come from someone else: symbolic links are followed, but
    what they lead to must be a regular file (a link to ``/dev/zero`` or ``/dev/stdin``, a FIFO, a device
    or a directory is a :class:`UserError` naming ``path``). Opened without blocking, so a FIFO with no
    writer cannot hang the check. ``FileNotFoundError`` passes through (callers name what is missing);
    any other ``OSError`` is a :class:`UserError`. ``what``: a few words for the message (``"weights"``)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            label = f" ({what})" if what else ""
            raise UserError(f"{path}{label}: {_kind(st.st_mode)}, not a regular file; refused")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes_bounded(path: Path, max_bytes: int, what: str = "") -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_regular`), refused with a :class:`UserError` when
    it holds more than ``max_bytes``: at most ``max_bytes + 1`` bytes are ever read."""
    path = Path(path)
    with open_regular(path, what) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        label = f" ({what})" if what else ""
        raise UserError(f"{path}{label}: larger than {max_bytes:,} bytes; refused")
    return data


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
