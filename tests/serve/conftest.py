"""Fixtures of the serve tests: a tiny real encoder (ONNX, made by hand) and embedding directories of real
images (coco128 photos; the tiny CIFAR npz, labelled; an approximate HNSW index of it), each built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import DATA, need

pytest.importorskip("onnxruntime")  # the [cpu] or [gpu] extra

PHOTOS = DATA / "coco128_det" / "images"
SIZE = 32  # the encoder's input side


def thumbnail_encoder(path: Path, size: int = SIZE, pool: int = 4) -> Path:
    """A simsiam-kit 'encoder' made by hand: the embedding is the normalised image average-pooled to
    (size / pool)^2 cells, 3 x 64 = 192 numbers at the defaults, so different photos differ."""
    import onnx
    from onnx import TensorProto, helper

    cells = (size // pool) ** 2 * 3
    nodes = [
        helper.make_node("AveragePool", ["images"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("Flatten", ["pooled"], ["embeddings"], axis=1),
    ]
    g = helper.make_graph(
        nodes,
        "thumbnail",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", cells])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    meta = {
        "format": "simsiam-kit-onnx-encoder",
        "image_size": str(size),
        "mean": "[0.485, 0.456, 0.406]",
        "std": "[0.229, 0.224, 0.225]",
        "channel_order": "RGB",
        "embedding_dim": str(cells),
        "input_name": "images",
        "output_name": "embeddings",
        "arch": "thumbnail",
        "head": "backbone",
    }
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="session")
def encoder(tmp_path_factory) -> Path:
    return thumbnail_encoder(tmp_path_factory.mktemp("serve_model") / "thumb.onnx")


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


def photo(i: int = 0) -> Path:
    """The i-th coco128 photo (sorted by name), as indexed by ``photo_index``."""
    return sorted(need(PHOTOS).glob("*.jpg"))[i]
