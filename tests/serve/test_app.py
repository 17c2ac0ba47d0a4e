"""The service in process (Starlette's TestClient): answers checked against the library search on real
images, the index facts it reports, and every bad request of issue 22 answered by one 4xx JSON message
while the app keeps serving."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")  # the [serve] extra
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from fastapi.testclient import TestClient  # noqa: E402

from simsiam_kit.export.embedder import OnnxEmbedder  # noqa: E402
from simsiam_kit.retrieval.embed_search import search_images  # noqa: E402
from simsiam_kit.retrieval.gallery import Gallery  # noqa: E402
from simsiam_kit.serve.app import ServeSettings, create_app  # noqa: E402


def _client(index_dir, encoder, **settings) -> TestClient:
    return TestClient(create_app(Gallery.open(index_dir), OnnxEmbedder(encoder, threads=1), ServeSettings(**settings)))


@pytest.fixture(scope="module")
def client(photo_index, encoder):
    with _client(photo_index, encoder) as c:
        yield c


def _upload(path_or_bytes, name="photo.jpg", ctype="image/jpeg"):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return {"image": (name, data, ctype)}


def _one_message(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["detail"] and isinstance(body["detail"], str) and body["detail"], body
    return body["detail"]


# --------------------------------------------------------------------------------------------- answers
def test_search_finds_the_photo_itself_first_and_matches_the_library_search(client, photo_index, encoder, photos):
    q = photos[7]
    r = client.post("/search?k=6", files=_upload(q))
    assert r.status_code == 200, r.text
    body = r.json()
    neigh = body["neighbours"]
    assert [n["rank"] for n in neigh] == [1, 2, 3, 4, 5, 6]
    assert neigh[0]["id"] == q.name and neigh[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert all(a["score"] >= b["score"] for a, b in zip(neigh, neigh[1:]))
    assert all(n["thumbnail"] == f"/items/{n['row']}/thumbnail" for n in neigh)
    assert body["approximate"] is False and body["index"]["kind"] == "flat" and body["k"] == 6
    # the same neighbours as the CLI's Python API (search_images) gives for the file
    ref = search_images(photo_index, q, lambda p: OnnxEmbedder(p, threads=1), k=6)["results"][0]["neighbours"]
    assert [n["row"] for n in neigh] == [n["row"] for n in ref]
    assert np.allclose([n["score"] for n in neigh], [n["score"] for n in ref], atol=1e-5)


def test_embed_returns_the_embedders_vector(client, encoder, photos):
    q = photos[2]
    r = client.post("/embed", files=_upload(q))
    assert r.status_code == 200, r.text
    v = np.asarray(r.json()["embedding"], np.float32)
    want = OnnxEmbedder(encoder, threads=1).embed([str(q)])[0]
    assert r.json()["dim"] == len(want) == 192
    assert np.allclose(v, want, atol=1e-6) and abs(np.linalg.norm(v) - 1) < 1e-5


def test_thumbnail_is_the_rows_image_scaled_down(client, photo_index, photos):
    from PIL import Image

    row = 5
    r = client.get(f"/items/{row}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    full = Image.open(photos[row])
    assert max(im.size) == 128 and abs(im.size[0] / im.size[1] - full.size[0] / full.size[1]) < 0.02
    # the thumbnail is the row's photo: close to the photo scaled the same way
    want = np.asarray(full.convert("RGB").resize(im.size, Image.BILINEAR), np.float32)
    assert np.abs(np.asarray(im.convert("RGB"), np.float32) - want).mean() < 8


def test_neighbours_of_a_row_start_with_the_row(client):
    r = client.get("/items/11/neighbours?k=3")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["row"] == 11 and body["neighbours"][0]["row"] == 11
    assert body["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_labels_and_class_names_are_reported(cifar_index, encoder, shared_tiny_npz):
    with np.load(shared_tiny_npz) as d:
        labels, names = d["labels"], [str(x) for x in d["class_names"]]
    with _client(cifar_index, encoder) as c:
        body = c.get("/items/4/neighbours?k=5").json()
        for n in body["neighbours"]:
            assert n["label"] == int(labels[n["id"]]) and n["class"] == names[n["label"]]
        assert c.get("/items/47/thumbnail").status_code == 200
        assert _one_message(c.get("/items/48/thumbnail"), 404).startswith("row 48 is not in the index")


def test_approximate_index_says_so_with_its_measured_recall(hnsw_index, encoder, tmp_path):
    with _client(hnsw_index, encoder) as c:
        h = c.get("/healthz").json()["index"]
        assert h["kind"] == "hnsw" and h["exact"] is False and h["recall"] is None
        body = c.get("/items/0/neighbours?k=4").json()
        assert body["approximate"] is True and body["recall"] is None
    # a directory whose index records a measured recall: the response carries it
    d = tmp_path / "emb"
    shutil.copytree(hnsw_index, d)
    m = json.loads((d / "embed.json").read_text())
    m["index"]["recall"] = 0.975
    (d / "embed.json").write_text(json.dumps(m))
    with _client(d, encoder) as c:
        body = c.get("/items/0/neighbours?k=4").json()
        assert body["approximate"] is True and body["recall"] == 0.975 and body["index"]["recall"] == 0.975


def test_page_static_files_and_docs_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "http://" not in page.text and "https://" not in page.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "https://" not in js.text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/search" in docs.text and "https://" not in docs.text
    spec = client.get("/openapi.json").json()
    assert {"/search", "/embed", "/healthz", "/items/{row}/thumbnail"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/search"]["post"]["requestBody"]["content"]


# --------------------------------------------------------------------------------------------- bad requests
def _png_header(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` pixels (IHDR, one tiny IDAT, IEND): a decompression bomb's header."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _still_serving(client):
    assert client.get("/healthz").json()["status"] == "ok"


def test_non_image_upload(client):
    msg = _one_message(client.post("/search", files=_upload(b"just some text\n" * 10, "notes.txt", "text/plain")), 400)
    assert "not an image" in msg
    _still_serving(client)


def test_truncated_jpeg(client, photos):
    data = photos[0].read_bytes()
    msg = _one_message(client.post("/search", files=_upload(data[: len(data) // 3])), 400)
    assert "cannot be decoded" in msg and "truncated" in msg
    _still_serving(client)


def test_decompression_bomb_is_refused_before_decoding(client):
    msg = _one_message(client.post("/search", files=_upload(_png_header(50_000, 50_000), "bomb.png", "image/png")), 413)
    assert "pixels" in msg and "refused before decoding" in msg
    # below PIL's own bomb limit but above ours
    msg = _one_message(client.post("/embed", files=_upload(_png_header(8000, 8000), "big.png", "image/png")), 413)
    assert "8000 x 8000" in msg
    _still_serving(client)


def test_upload_over_the_limit(photo_index, encoder, photos):
    by_size = sorted(photos, key=lambda p: p.stat().st_size)
    small, big = by_size[0].read_bytes(), by_size[-1].read_bytes()
    assert len(small) < 30 * 1024 < 40 * 1024 < len(big)
    with _client(photo_index, encoder, max_upload_mb=0.03) as c:  # 30 KiB
        # declared Content-Length over the limit: refused unread
        msg = _one_message(
            c.post("/search", content=big * 4, headers={"content-type": "multipart/form-data; boundary=x"}), 413
        )
        assert "--max-upload-mb" in msg
        # a file over the limit inside an allowed body
        msg = _one_message(c.post("/search", files=_upload(big)), 413)
        assert "--max-upload-mb" in msg
        assert c.post("/search", files=_upload(small)).status_code == 200
        _still_serving(c)


def test_chunked_body_over_the_limit_is_cut(photo_index, encoder):
    with _client(photo_index, encoder, max_upload_mb=0.03) as c:

        def chunks():
            yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
            for _ in range(200):
                yield b"\0" * 4096

        r = c.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert "--max-upload-mb" in _one_message(r, 413)
        _still_serving(c)


@pytest.mark.parametrize("k", ["-3", "0", "101", "1000000000", "ten", "2.5"])
def test_bad_k(client, k, photos):
    msg = _one_message(client.post(f"/search?k={k}", files=_upload(photos[0])), 422)
    assert msg.startswith("k: ")
    assert _one_message(client.get(f"/items/0/neighbours?k={k}"), 422).startswith("k: ")
    _still_serving(client)


def test_k_above_the_index_size_is_capped(cifar_index, encoder):
    with _client(cifar_index, encoder) as c:
        body = c.get("/items/0/neighbours?k=100").json()
        assert body["k"] == 48 and len(body["neighbours"]) == 48


@pytest.mark.parametrize(
    "url, status",
    [
        ("/items/-1/thumbnail", 404),
        ("/items/102/thumbnail", 404),
        ("/items/-1", 404),
        ("/items/../../etc/passwd", 404),
        ("/items/..%2F..%2Fetc%2Fpasswd/thumbnail", 404),
        ("/items/%2e%2e/%2e%2e/etc/passwd", 404),
        ("/static/..%2Fapp.py", 404),
        ("/items/1e3/thumbnail", 422),
    ],
)
def test_item_urls_that_are_not_rows(client, url, status):
    msg = _one_message(client.get(url), status)
    assert "passwd" not in msg or "row" in msg
    _still_serving(client)


@pytest.mark.parametrize(
    "body, ctype, status",
    [
        (b'--x\r\nContent-Disposition: form-data; name="image"\r\n\r\n', "multipart/form-data; boundary=x", 400),
        (b"garbage without any boundary", "multipart/form-data", 400),
        (b"garbage", "multipart/form-data; boundary=x", 400),
        (b'{"image": "/etc/passwd"}', "application/json", 415),
        (b"image=/etc/passwd", "application/x-www-form-urlencoded", 415),
    ],
)
def test_malformed_multipart(client, body, ctype, status):
    _one_message(client.post("/search", content=body, headers={"content-type": ctype}), status)
    _still_serving(client)


def test_two_files_or_an_empty_file(client, photos):
    files = [("image", ("a.jpg", photos[0].read_bytes(), "image/jpeg")), ("image", ("b.jpg", b"x", "image/jpeg"))]
    _one_message(client.post("/search", files=files), 400)
    assert "empty" in _one_message(client.post("/search", files=_upload(b"")), 400)
    _still_serving(client)


def test_model_of_another_width_is_refused(photo_index, tmp_path):
    from simsiam_kit.errors import UserError

    from helpers import write_thumbnail_encoder

    other = write_thumbnail_encoder(tmp_path / "other.onnx", size=16)  # 3 x 16 = 48-d
    with pytest.raises(UserError, match="192-d embeddings but the model gives 48-d"):
        create_app(Gallery.open(photo_index), OnnxEmbedder(other, threads=1))


def test_images_of_a_moved_dataset_are_404_and_search_still_works(cifar_index, encoder, tmp_path):
    d = tmp_path / "emb"
    shutil.copytree(cifar_index, d)
    m = json.loads((d / "embed.json").read_text())
    m["data"] = str(tmp_path / "moved.npz")
    (d / "embed.json").write_text(json.dumps(m))
    with _client(d, encoder) as c:
        msg = _one_message(c.get("/items/3/thumbnail"), 404)
        assert "not available" in msg and "moved.npz" in msg
        assert "not available" in _one_message(c.get("/items/3/neighbours"), 404)
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, format="PNG")
        r = c.post("/search?k=3", files=_upload(buf.getvalue(), "grey.png", "image/png"))
        assert r.status_code == 200 and len(r.json()["neighbours"]) == 3  # the index answers without its images


@pytest.mark.parametrize(
    "kind, backend, exact", [("flat", "torch", True), ("bf16", "torch", False), ("ivf", "faiss", False)]
)
def test_every_index_kind_is_served(kind, backend, exact, shared_tiny_npz, encoder, tmp_path):
    """(flat/faiss and hnsw are the fixtures above.) Each row's own image finds the row first."""
    from simsiam_kit.retrieval.embed_search import embed_dataset_to_dir

    d = tmp_path / "emb"
    embed_dataset_to_dir(OnnxEmbedder(encoder, threads=1), str(shared_tiny_npz), d, index_kind=kind, backend=backend)
    with _client(d, encoder) as c:
        h = c.get("/healthz").json()["index"]
        assert (h["kind"], h["backend"], h["exact"]) == (kind, backend, exact)
        for row in (0, 17, 40):
            body = c.get(f"/items/{row}/neighbours?k=5").json()
            assert body["approximate"] is (not exact) and body["neighbours"][0]["row"] == row
