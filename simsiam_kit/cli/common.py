"""What every command shares: one-line user errors and the exit codes."""

from __future__ import annotations

import functools

import typer

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


def os_error_message(e: OSError) -> str:
    """One line for an operating-system error, naming the path when the error carries one."""
    what = e.strerror or type(e).__name__
    if e.filename is not None and e.filename2 is not None:
        return f"{e.filename} -> {e.filename2}: {what}"
    if e.filename is not None:
        return f"{e.filename}: {what}"
    return f"{what} ({e})" if str(e) and str(e) != what else what


# What the user can do about an error whose ``remedy`` (set by the lower layer that raised it, see
# simsiam_kit.data.datasets.remedy_of) is one of these keys, in the words of each kind of command: the data
# layer states the fact ("cannot read image X"), the command names its own option.
EVAL_REMEDIES = {
    "skip_bad_images": "--skip-bad-images skips unreadable images",
    "download": "--data-root names where it lives, --download fetches it",
    "overwrite": "--overwrite replaces them, --output writes elsewhere",
}
PRETRAIN_REMEDIES = {
    "skip_bad_images": "--set data.skip_bad_images=true skips unreadable images",
    "download": "set data.root to where it lives, or allow the download with --set data.download=true",
}
EMBED_REMEDIES = {"skip_bad_images": "--skip-bad-images skips unreadable images"}


def with_remedy(e: Exception, remedies: dict) -> str:
    msg = str(e)
    remedy = getattr(e, "remedy", None)
    if remedy is None and remedies and msg.startswith("cannot read image"):
        from simsiam_kit.data.datasets import remedy_of  # a DataLoader worker's error loses its class

        remedy = remedy_of(e)
    hint = remedies.get(remedy) if remedy else None
    return f"{msg} ({hint})" if hint else msg


def user_errors(fn=None, *, remedies: dict | None = None):
    """Turn :class:`UserError` and operating-system errors (a read-only or full disk, a path that is a
    file) into one line on stderr and exit 2, and Ctrl-C into exit 130. Library code that writes files
    raises ``UserError`` naming the path (``utils/io.py``); an ``OSError`` that reaches this wrapper is
    printed with the path it carries. ``remedies``: the command's words for what a user can do about an
    error that carries a ``remedy`` (:data:`EVAL_REMEDIES`, :data:`PRETRAIN_REMEDIES`)."""
    if fn is None:
        return functools.partial(user_errors, remedies=remedies)
    remedies = remedies or {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from simsiam_kit.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err(with_remedy(e, remedies))
            raise typer.Exit(EXIT_USER_ERROR) from None
        except OSError as e:
            err(os_error_message(e))
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper
