"""Fixtures shared by the whole suite. Plain helpers (paths, the shared-data rule, ``cli``) are in ``helpers.py``."""

import os
from pathlib import Path

import pytest

from helpers import CIFAR_VAL, cli, need, tiny_overrides, write_tiny_npz

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True, scope="session")
def _private_choice_cache(tmp_path_factory):
    """Runtime / index choices measured by tests go to a cache of their own, never the user's
    (``simsiam_kit.utils.probe.cache_path``)."""
    os.environ["SIMSIAM_KIT_CACHE"] = str(tmp_path_factory.mktemp("simsiam_kit_cache"))


@pytest.fixture
def cifar_val() -> Path:
    return need(CIFAR_VAL)


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """48 real CIFAR images (16 px crops of val.npz), 3 classes, written as a .npz (a fresh copy per test, so a
    test may change or damage it)."""
    return write_tiny_npz(tmp_path / "tiny.npz")


@pytest.fixture(scope="session")
def shared_tiny_npz(tmp_path_factory) -> Path:
    """The same 48-image npz, written once for the session: read it, never change it."""
    return write_tiny_npz(tmp_path_factory.mktemp("tiny") / "tiny.npz")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shared_tiny_npz) -> Path:
    """A finished one-epoch pretraining run on the tiny npz (16 px, small heads, fp32), made once for the session:
    read it, never change it. Its backbone is ``RUN/backbone.pt``."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    r = cli("pretrain", "--output", out, sets=tiny_overrides(str(shared_tiny_npz), str(shared_tiny_npz)))
    assert r.exit_code == 0, r.output
    return out
