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


def user_errors(fn):
    """Turn :class:`UserError` and operating-system errors (a read-only or full disk, a path that is a
    file) into one line on stderr and exit 2, and Ctrl-C into exit 130. Library code that writes files
    raises ``UserError`` naming the path (``utils/io.py``); an ``OSError`` that reaches this wrapper is
    printed with the path it carries."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from simsiam_kit.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err(str(e))
            raise typer.Exit(EXIT_USER_ERROR) from None
        except OSError as e:
            err(os_error_message(e))
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper
