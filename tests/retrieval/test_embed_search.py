"""OnnxEmbedder preprocessing (hand-worked answers), embed + search commands, index round trip, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx  # noqa: E402  (a hard dependency)
import pytest
import torch
from typer.testing import CliRunner

from simsiam_kit.cli import app  # noqa: E402
from simsiam_kit.errors import UserError  # noqa: E402
from simsiam_kit.export.embedder import OnnxEmbedder, preprocess  # noqa: E402

from helpers import DATA, needs_shared

SHARED = DATA
CIFAR_VAL = SHARED / "cifar10" / "val.npz"
FOLDER_VAL = SHARED / "cifar10" / "imagefolder_sample" / "val"
needs_cifar = needs_shared(CIFAR_VAL, FOLDER_VAL)
runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _mean_pool_model(path: Path, size: int = 4) -> Path:
    """A hand-made simsiam-kit 'encoder': the embedding is the per-channel mean of the normalised input."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["embeddings"], axis=1),
    ]
    g = helper.make_graph(
        nodes,
        "mean_pool",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 3])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    meta = {
        "format": "simsiam-kit-onnx-encoder",
        "image_size": str(size),
        "mean": "[0.5, 0.5, 0.5]",
        "std": "[0.25, 0.5, 1.0]",
        "channel_order": "RGB",
        "embedding_dim": "3",
        "input_name": "images",
        "output_name": "embeddings",
    }
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _mean_pool_model(tmp_path_factory.mktemp("tiny") / "mean_pool.onnx")


# ----------------------------------------------------------------------------- preprocessing by hand
def test_solid_colour_embedding_worked_by_hand(tiny):
    from PIL import Image

    emb = OnnxEmbedder(tiny, normalize=False)
    rgb = np.zeros((4, 4, 3), np.uint8) + np.array([255, 0, 51], np.uint8)
    # (255/255 - .5)/.25 = 2, (0 - .5)/.5 = -1, (51/255 - .5)/1 = -0.3
    want = np.array([[2.0, -1.0, -0.3]], np.float32)
    assert np.allclose(emb.embed(rgb), want, atol=1e-6)
    assert np.allclose(OnnxEmbedder(tiny).embed(rgb), want / np.linalg.norm(want), atol=1e-6)
    # RGBA (alpha dropped), a PIL image, a batch of two, and another size (resized, then cropped)
    assert np.allclose(emb.embed(np.dstack([rgb, np.full((4, 4), 9, np.uint8)])), want, atol=1e-6)
    assert np.allclose(emb.embed(Image.fromarray(rgb)), want, atol=1e-6)
    assert emb.embed(np.stack([rgb, rgb])).shape == (2, 3)
    big = np.zeros((10, 7, 3), np.uint8) + np.array([255, 0, 51], np.uint8)
    assert np.allclose(emb.embed(big), want, atol=1e-6)


def test_grayscale_and_palette_images_are_converted(tiny):
    from PIL import Image

    emb = OnnxEmbedder(tiny, normalize=False)
    # gray 51 -> (51, 51, 51): ((0.2 - .5)/.25, (0.2 - .5)/.5, 0.2 - .5) = (-1.2, -0.6, -0.3)
    want = np.array([[-1.2, -0.6, -0.3]], np.float32)
    gray = np.full((4, 4), 51, np.uint8)
    for img in (gray, gray[..., None], Image.fromarray(gray, "L"), Image.fromarray(gray, "L").convert("P")):
        assert np.allclose(emb.embed(img), want, atol=1e-6), type(img)


def test_resize_matches_torchvision_eval_transform():
    """Other sizes: shorter side to round(S / 0.875), centre crop S, as the ImageFolder eval loader does."""
    from PIL import Image
    from torchvision.transforms import v2 as T

    rng = np.random.default_rng(0)
    for h, w in ((40, 52), (53, 31), (32, 32), (20, 20)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = preprocess(img, 32, (0, 0, 0), (1, 1, 1))
        if (h, w) == (32, 32):
            ref = img  # already the model's size: used as it is
        else:
            ref = np.asarray(T.Compose([T.Resize(round(32 / 0.875)), T.CenterCrop(32)])(Image.fromarray(img)))
        assert np.allclose(got[0].transpose(1, 2, 0), ref.astype(np.float32) / 255, atol=1e-7), (h, w)


def test_bad_image_inputs_are_clear_errors(tiny, tmp_path):
    emb = OnnxEmbedder(tiny)
    with pytest.raises(UserError, match="expected uint8"):
        emb.embed(np.zeros((4, 4, 3), np.float64))
    with pytest.raises(UserError, match="channels last"):
        emb.embed(np.zeros((3, 4, 5, 6), np.uint8)[0])  # (4, 5, 6): 6 channels
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="broken.png"):
        emb.embed(str(tmp_path / "broken.png"))


# ----------------------------------------------------------------------------- embed + search
@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from simsiam_kit.engine.checkpoint import save_backbone
    from simsiam_kit.export.onnx import export_onnx
    from simsiam_kit.models import build_backbone

    d = tmp_path_factory.mktemp("search_enc")
    torch.manual_seed(0)
    m = build_backbone("resnet18", "cifar", zero_init_residual=False).eval()
    save_backbone(d / "bb.pt", m, "resnet18", "cifar", {"image_size": 32})
    export_onnx(str(d / "bb.pt"), d / "enc.onnx", parity_data=None)
    return d / "enc.onnx"


@needs_cifar
def test_embed_npz_then_search_finds_each_query_itself(encoder, tmp_path):
    from PIL import Image

    from simsiam_kit.data.datasets import load_dataset

    out = tmp_path / "emb"
    res = _cli(
        "embed",
        "--model",
        encoder,
        "--data",
        f"{CIFAR_VAL}[:100]",
        "--output",
        out,
        "--batch-size",
        32,
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    ds = load_dataset(f"{CIFAR_VAL}[:100]")
    z = np.load(out / "embeddings.npy")
    assert z.shape == (100, 512) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    assert json.loads((out / "ids.json").read_text()) == list(range(100))
    assert np.array_equal(np.load(out / "labels.npy"), ds.labels)
    assert json.loads((out / "embed.json").read_text())["index"] == {"kind": "flat", "backend": "faiss"}
    assert (out / "index.faiss").is_file()

    q = tmp_path / "queries"
    q.mkdir()
    rows = [0, 41, 99]
    for r in rows:  # PNG is lossless: the query pixels are exactly the indexed ones
        Image.fromarray(ds.images[r]).save(q / f"row{r:03d}.png")
    res = _cli("search", "--index", out, "--query", q, "--k", 5)
    assert res.exit_code == 0, res.output
    assert "row041.png" in res.output and "score" in res.output
    rep = json.loads((out / "search.json").read_text())
    assert [Path(r["query"]).name for r in rep["results"]] == [f"row{r:03d}.png" for r in rows]
    for r, result in zip(rows, rep["results"]):
        first = result["neighbours"][0]
        assert first["row"] == r and first["id"] == r and first["score"] > 0.9999
        assert first["class"] == ds.classes[ds.labels[r]]
        assert len(result["neighbours"]) == 5
        scores = [n["score"] for n in result["neighbours"]]
        assert scores == sorted(scores, reverse=True)

    # an index built with another model (3-d embeddings vs 512-d): clear error, exit 2
    tiny = _mean_pool_model(tmp_path / "other.onnx")
    res = _cli("search", "--index", out, "--query", q, "--model", tiny)
    assert res.exit_code == 2 and "512-d model" in res.output and "3-d" in res.output


@needs_cifar
def test_embed_image_folder_hnsw_ids_are_file_names(encoder, tmp_path):
    out = tmp_path / "emb"
    res = _cli("embed", "--model", encoder, "--data", FOLDER_VAL, "--output", out, "--index", "hnsw", "--no-progress")
    assert res.exit_code == 0, res.output
    ids = json.loads((out / "ids.json").read_text())
    assert len(ids) == 100 and "bird/00005.png" in ids
    query = FOLDER_VAL / "bird" / "00005.png"
    res = _cli("search", "--index", out, "--query", query, "--k", 3, "--output", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    first = json.loads((tmp_path / "s.json").read_text())["results"][0]["neighbours"][0]
    assert first["id"] == "bird/00005.png" and first["class"] == "bird" and first["score"] > 0.9999


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_save_load_round_trip(tmp_path, kind):
    pytest.importorskip("faiss")
    from simsiam_kit.retrieval.index import EmbeddingIndex

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = EmbeddingIndex(16, kind, backend="faiss").add(x)
    s1, i1 = idx.search(x[:10], 4)
    idx.save(tmp_path / "ix")
    loaded = EmbeddingIndex.load(tmp_path / "ix", use_gpu=False)
    assert (loaded.kind, loaded.dim, loaded.ntotal) == (kind, 16, 300)
    s2, i2 = loaded.search(x[:10], 4)
    assert np.array_equal(i1, i2) and np.allclose(s1, s2)
    if kind == "flat":  # exact search: every vector is its own nearest neighbour
        assert np.array_equal(i1[:, 0], np.arange(10)) and np.allclose(s1[:, 0], 1, atol=1e-5)


def test_search_bad_inputs(tiny, tmp_path):
    res = _cli("search", "--index", tmp_path / "nowhere", "--query", tmp_path)
    assert res.exit_code == 2 and "embed.json" in res.output
    res = _cli("embed", "--model", tiny, "--data", "demo:val[:8]", "--output", tmp_path / "e", "--index", "kdtree")
    assert res.exit_code == 2 and "unknown index kind 'kdtree'" in res.output
    res = _cli("embed", "--model", tmp_path / "missing.onnx", "--data", "demo:val[:8]", "--output", tmp_path / "e")
    assert res.exit_code == 2 and "missing.onnx" in res.output
