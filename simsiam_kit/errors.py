"""User-facing errors.

Anything a user can cause (bad path, bad key, bad value, corrupt file) raises :class:`UserError`.
The CLI turns it into one line on stderr and exit code 2, never a traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls; its message names the file, key or value."""


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def require_extra(module: str, extra: str):
    """Import an optional dependency or fail with a message naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"'{module}' is not installed ({e}); install it with: pip install -e '.[{extra}]'") from None
