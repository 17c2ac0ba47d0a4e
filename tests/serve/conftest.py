"""Fixtures of the serve tests: a tiny real encoder (ONNX, made by hand) and embedding directories of real
images (coco128 photos; the tiny CIFAR npz, labelled; an approximate HNSW index of it), each built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import DATA, need, write_thumbnail_encoder

pytest.importorskip("onnxruntime")  # the [cpu] or [gpu] extra

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
