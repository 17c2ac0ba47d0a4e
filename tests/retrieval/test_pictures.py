"""Neighbour pictures: the shared grid drawing (sizes, frames, tiles checked in the PNG's pixels) and the
contact sheets of ``search`` next to its JSON, drawn from a real embedding directory."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from simsiam_kit.retrieval.pictures import Tile, neighbour_grid, search_with_pictures, sheet_paths

from helpers import write_thumbnail_encoder

pytest.importorskip("onnxruntime")  # the [cpu] or [gpu] extra


def _solid(rgb, size=16):
    return np.zeros((size, size, 3), np.uint8) + np.array(rgb, np.uint8)


def test_grid_size_tiles_and_frames(tmp_path):
    rows = [
        [Tile(_solid((255, 0, 0)), "query"), Tile(_solid((0, 0, 255)), "0.900\ncat", match=True)],
        [Tile(_solid((255, 0, 0)), "query"), Tile(None, "gone"), Tile(_solid((0, 0, 255)), "0.5", match=False)],
    ]
    p = neighbour_grid(rows, tmp_path / "g.png", tile_inches=1.0, dpi=100)
    im = np.asarray(Image.open(p).convert("RGB")).astype(int)
    lines = 2  # the tallest caption has two lines
    assert im.shape[:2] == (round((1.0 + 0.18 * lines + 0.1) * 2 * 100), 3 * 100)
    red = ((im[..., 0] > 240) & (im[..., 1] < 15) & (im[..., 2] < 15)).sum()
    blue = ((im[..., 2] > 240) & (im[..., 0] < 15) & (im[..., 1] < 15)).sum()
    assert red > 2 * 1000 and blue > 2 * 1000  # two red and two blue tiles of ~60 x 60 px
    green = (np.abs(im - np.array([44, 160, 44])).sum(-1) < 30).sum()  # matplotlib's tab:green frame
    tab_red = (np.abs(im - np.array([214, 39, 40])).sum(-1) < 30).sum()
    assert green > 100 and tab_red > 100
    assert not list(tmp_path.glob(".*"))  # written atomically: no temp file left


def test_nothing_to_draw_is_an_error(tmp_path):
    from simsiam_kit.errors import UserError

    with pytest.raises(UserError, match="no queries"):
        neighbour_grid([], tmp_path / "g.png")


def test_sheet_paths(tmp_path):
    out = tmp_path / "search.json"
    assert sheet_paths(out, 1) == [tmp_path / "search.png"]
    assert sheet_paths(out, 16) == [tmp_path / "search.png"]
    assert sheet_paths(out, 17) == [tmp_path / "search-1.png", tmp_path / "search-2.png"]
    assert sheet_paths(out, 5, per_sheet=2) == [tmp_path / f"search-{i}.png" for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def indexed(shared_tiny_npz, tmp_path_factory):
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.embed_search import embed_dataset_to_dir

    d = tmp_path_factory.mktemp("pictures")
    enc = write_thumbnail_encoder(d / "thumb.onnx")
    embed_dataset_to_dir(OnnxEmbedder(enc, threads=1), str(shared_tiny_npz), d / "emb")
    queries = d / "queries"
    queries.mkdir()
    with np.load(shared_tiny_npz) as z:
        for i in (0, 5, 9):
            Image.fromarray(z["images"][i]).save(queries / f"q{i}.png")
    return d / "emb", enc, queries


def test_search_writes_its_pictures_next_to_the_json(indexed, tmp_path):
    from simsiam_kit.export.embedder import OnnxEmbedder

    emb, enc, queries = indexed
    out = tmp_path / "res" / "search.json"
    report = search_with_pictures(emb, queries, lambda p: OnnxEmbedder(p, threads=1), k=4, output=out)
    assert report["pictures"] == [str(tmp_path / "res" / "search.png")]
    im = Image.open(report["pictures"][0])
    want = (1.2 * 5 * 110, (1.2 + 0.18 * 2 + 0.1) * 3 * 110)  # 3 queries x (query + 4), 2-line captions
    assert all(abs(got - w) <= 1 for got, w in zip(im.size, want)), (im.size, want)
    # each query (a row of the index) finds itself first
    for r, i in zip(report["results"], (0, 5, 9)):
        assert r["neighbours"][0]["row"] == i and r["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert "class" in r["neighbours"][0]


def test_missing_images_become_blank_tiles_with_a_warning(indexed, tmp_path):
    import json
    import shutil

    from simsiam_kit.export.embedder import OnnxEmbedder

    emb, enc, queries = indexed
    moved = tmp_path / "emb"
    shutil.copytree(emb, moved)
    m = json.loads((moved / "embed.json").read_text())
    m["data"] = str(tmp_path / "gone.npz")
    (moved / "embed.json").write_text(json.dumps(m))
    said = []
    report = search_with_pictures(
        moved,
        queries / "q0.png",
        lambda p: OnnxEmbedder(p, threads=1),
        k=3,
        output=tmp_path / "s.json",
        log=said.append,
    )
    assert (tmp_path / "s.png").is_file() and report["pictures"] == [str(tmp_path / "s.png")]
    assert len(said) == 1 and "not available" in said[0] and "gone.npz" in said[0]
