"""Result files of detection transfer (``results.json``, detections, converted ``.pkl``) written atomically
and then given the mode a plain ``open()`` would have given them: ``0666`` minus the umask (``0644`` under
the usual ``022``). ``simsiam_kit.utils.io`` writes through ``tempfile.mkstemp``, which creates ``0600``
files, so without this a result file is readable by its owner only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


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


def make_readable(path) -> Path:
    """Set ``path`` to ``0666 & ~umask``, the mode of a file created with ``open(path, "w")``."""
    path = Path(path)
    os.chmod(path, 0o666 & ~current_umask())
    return path


def write_json(path, obj: Any) -> Path:
    from simsiam_kit.utils.io import atomic_write_json

    atomic_write_json(Path(path), obj)
    return make_readable(path)


def write_bytes(path, data: bytes) -> Path:
    from simsiam_kit.utils.io import atomic_write_bytes

    atomic_write_bytes(Path(path), data)
    return make_readable(path)
