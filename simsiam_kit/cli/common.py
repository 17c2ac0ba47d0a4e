"""What every command shares: one-line user errors and the exit codes."""

from __future__ import annotations

import functools

import typer

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


def user_errors(fn):
    """Turn :class:`UserError` (and Ctrl-C) into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from simsiam_kit.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err(str(e))
            raise typer.Exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED)

    return wrapper
