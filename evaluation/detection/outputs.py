"""Result files of detection transfer (``results.json``, detections, converted ``.pkl``) written atomically
with the mode a plain ``open()`` would give them (``0666`` minus the umask): ``simsiam_kit.utils.io``'s
writers already do this; :func:`make_readable` also fixes files written by other means (detectron2)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from simsiam_kit.utils.io import current_umask


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
