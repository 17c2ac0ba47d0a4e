import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
CIFAR_VAL = DATA / "cifar10" / "val.npz"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def need(path: Path) -> Path:
    """Shared data for a test: skipped where it is absent, but under CI=true (``.ci/run``) its absence fails
    the test, so a CI run can never pass by skipping everything that reads real data."""
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"shared data missing under CI=true: {path}")
        pytest.skip(f"shared data not available: {path}")
    return path


def needs_shared(*paths: Path):
    """A skip mark for tests that read ../shared; under CI=true it never skips (the test then fails on the
    missing file), so CI cannot pass by skipping everything that reads real data."""
    missing = [p for p in paths if not p.exists()]
    ci = os.environ.get("CI", "").lower() == "true"
    return pytest.mark.skipif(bool(missing) and not ci, reason=f"shared data not available: {missing[:1]}")


@pytest.fixture
def cifar_val() -> Path:
    return need(CIFAR_VAL)


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """48 real CIFAR images (16 px crops of val.npz), 3 classes, written as a .npz."""
    with np.load(need(CIFAR_VAL)) as d:
        keep = np.flatnonzero(d["labels"] < 3)[:48]
        images = np.ascontiguousarray(d["images"][keep][:, 8:24, 8:24])
        labels = d["labels"][keep]
    p = tmp_path / "tiny.npz"
    np.savez(p, images=images, labels=labels, class_names=np.array(["airplane", "automobile", "bird"]))
    return p


def tiny_overrides(train: str, val: str | None = None, epochs: int = 1, batch: int = 16) -> list[str]:
    """--set overrides for a seconds-long run: small heads, 16 px, fp32, no plots."""
    return [
        f"data.train={train}",
        f"data.val={val if val else 'null'}",
        "data.image_size=16",
        "model.proj_dim=64",
        "model.proj_hidden=64",
        "model.pred_hidden=16",
        f"optim.epochs={epochs}",
        f"optim.batch_size={batch}",
        "train.progress=false",
        "train.precision=fp32",
        "train.knn_every=1",
        "train.knn_k=5",
        "train.log_every=1",
        "train.plots=false",
    ]
