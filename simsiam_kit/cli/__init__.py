"""``simsiam-kit`` command line: the only layer that imports the core, ``evaluation`` and ``export``.

Thin: each command parses its options, calls one library function and prints. One module per command
area, each owning its ``typer.Typer()``; :mod:`simsiam_kit.cli.app` adds them to the main app. Options
shared by several commands are declared once in :mod:`simsiam_kit.cli.options`. Heavy and optional
imports (torch models, faiss, onnxruntime, detectron2, matplotlib) happen inside the command bodies, so
``simsiam-kit --help`` is instant. A user error prints one line on stderr and exits with code 2.

Where a change goes: a new option shared by commands -> ``options.py``; a new command -> a module here
with its own ``app``, added in ``app.py``.
"""

from simsiam_kit.cli.app import app, main

__all__ = ["app", "main"]
