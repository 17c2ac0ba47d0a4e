"""Gallery: an embedding directory's rows mapped back to their images and facts, never outside the dataset;
images bounded by their header before decoding."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from simsiam_kit.errors import UserError
from simsiam_kit.retrieval.gallery import Gallery, ImageTooLarge, index_recall, open_image

from helpers import write_thumbnail_encoder

pytest.importorskip("onnxruntime")  # the [cpu] or [gpu] extra


def _embed(data, out, enc):
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.embed_search import embed_dataset_to_dir

    embed_dataset_to_dir(OnnxEmbedder(enc, threads=1), str(data), out)
    return out


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return write_thumbnail_encoder(tmp_path_factory.mktemp("gallery") / "thumb.onnx")


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder of 6 solid-colour PNGs in 2 classes, and a secret file beside it."""
    root = tmp_path / "images"
    for c, cls in enumerate(("blue", "red")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            rgb = (40 * i, 0, 200) if c == 0 else (200, 40 * i, 0)
            Image.fromarray(np.zeros((20, 24, 3), np.uint8) + np.array(rgb, np.uint8)).save(root / cls / f"{i}.png")
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / "secret.png")
    return root


def test_folder_rows_facts_and_images(folder, enc, tmp_path):
    g = Gallery.open(_embed(folder, tmp_path / "emb", enc))
    assert g.count == 6 and g.dim == 192 and g.ids[4] == "red/1.png"
    assert g.item(4) == {"row": 4, "id": "red/1.png", "label": 1, "class": "red"}
    assert np.asarray(g.image(4))[0, 0].tolist() == [200, 40, 0]
    thumb = Image.open(io.BytesIO(g.thumbnail(4, size=12)))
    assert thumb.size == (12, 10)  # 24 x 20 scaled to fit 12 x 12
    assert g.info() == {"kind": "flat", "backend": "faiss", "exact": True, "recall": None, "count": 6, "dim": 192}
    sims, rows = g.search(np.asarray([[1.0] + [0.0] * 191], np.float32), 100)  # k capped at the count
    assert rows.shape == (1, 6)
    for bad in (-1, 6, True, 2.0, "1"):
        with pytest.raises(UserError, match="not in the index"):
            g.image(bad)


def test_ids_cannot_point_outside_the_dataset(folder, enc, tmp_path):
    d = _embed(folder, tmp_path / "emb", enc)
    ids = json.loads((d / "ids.json").read_text())
    ids[0], ids[1] = "../secret.png", str(tmp_path / "secret.png")  # relative escape, absolute path
    (d / "ids.json").write_text(json.dumps(ids))
    g = Gallery.open(d)
    for row in (0, 1):
        with pytest.raises(UserError, match="is not a file under"):
            g.image(row)
    assert np.asarray(g.image(2))[0, 0].tolist() == [80, 0, 200]


def test_array_dataset_rows_by_id(shared_tiny_npz, enc, tmp_path):
    g = Gallery.open(_embed(f"{shared_tiny_npz}[10:20]", tmp_path / "emb", enc))
    with np.load(shared_tiny_npz) as z:
        images, labels, names = z["images"], z["labels"], [str(c) for c in z["class_names"]]
    assert g.ids == list(range(10, 20))
    assert np.array_equal(np.asarray(g.image(3)), images[13])
    assert g.item(3)["class"] == names[labels[13]]


def test_a_moved_dataset_is_one_clear_error(shared_tiny_npz, enc, tmp_path):
    d = _embed(shared_tiny_npz, tmp_path / "emb", enc)
    m = json.loads((d / "embed.json").read_text())
    m["data"] = str(tmp_path / "moved.npz")
    (d / "embed.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="images of .* are not available: dataset not found"):
        Gallery.open(d).image(0)


def test_index_recall_where_recorded():
    assert index_recall({"index": {"kind": "hnsw", "recall": 0.93}}) == 0.93
    assert index_recall({"index": {"kind": "ivf"}}, {"measured_recall": {"recall_at_10": 0.88}}) == 0.88
    assert index_recall({"index": {"kind": "ivf", "recall": True}}) is None
    assert index_recall({}) is None


def _png_declaring(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


def test_open_image_refuses_bombs_and_bad_files():
    with pytest.raises(ImageTooLarge, match="refused before decoding"):
        open_image(io.BytesIO(_png_declaring(50_000, 50_000)))
    with pytest.raises(ImageTooLarge, match="300 x 200 pixels, more than the 1,000 allowed"):
        open_image(io.BytesIO(_png_declaring(300, 200)), max_pixels=1000)
    with pytest.raises(UserError, match="cannot be decoded"):
        open_image(io.BytesIO(_png_declaring(300, 200)))  # the header is fine, the pixel data is not there
    with pytest.raises(UserError, match="not an image"):
        open_image(io.BytesIO(b"hello"), what="upload")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((5, 7), np.uint8), "L").save(buf, format="PNG")
    assert open_image(io.BytesIO(buf.getvalue())).mode == "RGB"


def test_symlinked_files_inside_the_dataset_still_show(folder, enc, tmp_path):
    (folder / "red" / "2.png").unlink()
    (folder / "red" / "2.png").symlink_to(tmp_path / "secret.png")  # the dataset owner's own link
    g = Gallery.open(_embed(folder, tmp_path / "emb", enc))
    assert np.asarray(g.image(5))[0, 0].tolist() == [7, 7, 7]
