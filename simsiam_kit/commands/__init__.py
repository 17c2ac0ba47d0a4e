"""Being moved to :mod:`simsiam_kit.cli` (issue 10)."""
