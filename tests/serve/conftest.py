"""Fixtures of the serve tests: a tiny real encoder (ONNX, made by hand) and embedding directories of real
images (coco128 photos; the tiny CIFAR npz, labelled; an approximate HNSW index of it), each built once."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import pytest

from helpers import DATA, need, write_thumbnail_encoder

pytest.importorskip("onnxruntime")  # the [cpu] or [gpu] extra

# Outside CI the serve tests skip without the extra (each module's importorskip); under CI=true (.ci/run) a
# missing extra fails the run here instead, so CI cannot pass by skipping them.
if os.environ.get("CI", "").lower() == "true":
    _missing = [m for m in ("fastapi", "uvicorn", "python_multipart") if importlib.util.find_spec(m) is None]
    if _missing:
        raise RuntimeError(f"tests/serve under CI=true need the serve extra (pip install -e '.[serve]'): no {_missing}")

PHOTOS = DATA / "coco128_det" / "images"


@pytest.fixture(scope="session")
def encoder(tmp_path_factory) -> Path:
    return write_thumbnail_encoder(tmp_path_factory.mktemp("serve_model") / "thumb.onnx")


def _embed(encoder: Path, data: str, out: Path, kind: str = "flat") -> Path:
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.embed_search import embed_dataset_to_dir

    embed_dataset_to_dir(OnnxEmbedder(encoder, threads=1), data, out, index_kind=kind)
    return out


@pytest.fixture(scope="session")
def photo_index(encoder, tmp_path_factory) -> Path:
    """The 102 coco128 photos (an unlabelled ImageFolder), exact flat index."""
    return _embed(encoder, str(need(PHOTOS)), tmp_path_factory.mktemp("serve_photos") / "emb")


@pytest.fixture(scope="session")
def cifar_index(encoder, shared_tiny_npz, tmp_path_factory) -> Path:
    """48 labelled CIFAR images (3 classes, with names), exact flat index."""
    return _embed(encoder, str(shared_tiny_npz), tmp_path_factory.mktemp("serve_cifar") / "emb")


@pytest.fixture(scope="session")
def hnsw_index(encoder, shared_tiny_npz, tmp_path_factory) -> Path:
    """The same 48 images in an approximate (HNSW) index."""
    return _embed(encoder, str(shared_tiny_npz), tmp_path_factory.mktemp("serve_hnsw") / "emb", kind="hnsw")


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """The coco128 photos sorted by name: row i of ``photo_index`` is ``photos[i]``."""
    return sorted(need(PHOTOS).glob("*.jpg"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(index_dir: Path, log: Path, *args: str):
    """``simsiam-kit serve --index INDEX_DIR ARGS`` in a subprocess on a free loopback port (default host),
    ``--max-upload-mb 1 --threads 1``: yields ``(base_url, process, log)``; stopped on exit."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["serve", "--index", str(index_dir), "--port", str(port), "--max-upload-mb", "1", "--threads", "1", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "simsiam_kit", *argv], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield base, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def photo_server(photo_index, tmp_path_factory):
    """``photo_index`` served with the default settings (one encoder call per request)."""
    pytest.importorskip("fastapi")  # the [serve] extra
    with running_server(photo_index, tmp_path_factory.mktemp("serve_log") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="session")
def photo_server_batching(photo_index, tmp_path_factory):
    """``photo_index`` served with ``--batching`` (dynamic batching of encoder calls)."""
    pytest.importorskip("fastapi")  # the [serve] extra
    with running_server(photo_index, tmp_path_factory.mktemp("serve_log") / "server.log", "--batching") as srv:
        yield srv
