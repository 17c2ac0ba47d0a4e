"""User-facing errors.

Anything a user can cause (bad path, bad key, bad value, corrupt file) raises :class:`UserError`.
The CLI turns it into one line on stderr and exit code 2, never a traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls; its message names the file, key or value. ``remedy``: a
    key the command layer turns into its own words for what to do (``simsiam_kit/cli/common.py``), or None."""

    remedy: "str | None" = None


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def require_extra(module: str, extra: str):
    """Import an optional dependency or fail with a message naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"'{module}' is not installed ({e}); install it with: pip install -e '.[{extra}]'") from None


def check_number(name: str, value, low=None, high=None, *, low_open: bool = False, integer: bool = False) -> None:
    """``value`` must be a finite number (an integer when ``integer``) in ``[low, high]`` (``(low, high]`` when
    ``low_open``; either bound None = unbounded); otherwise one :class:`UserError` naming ``name`` (an option
    such as ``--lr`` or a key) and the value. NaN fails every comparison, so it is refused by name first."""
    import math

    kind = "an integer" if integer else "a finite number"
    bounds = []
    if low is not None:
        bounds.append(f"> {low:g}" if low_open else f">= {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    want = kind + (" " + " and ".join(bounds) if bounds else "")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (isinstance(value, int) if integer else math.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise UserError(f"{name} {value!r}: expected {want}")
