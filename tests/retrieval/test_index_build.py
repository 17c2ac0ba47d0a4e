"""index build (simsiam_kit/retrieval/index_build.py): the auto rule, the exact ground truth, recall, every
kind loaded back through EmbeddingIndex, on-disk lists equal to in-memory ones, hostile on-disk files,
shards with checksums, and a SIGKILLed build rerun to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from simsiam_kit.errors import UserError

faiss = pytest.importorskip("faiss")

from simsiam_kit.retrieval.files import check_faiss_file  # noqa: E402
from simsiam_kit.retrieval.index import EmbeddingIndex  # noqa: E402
from simsiam_kit.retrieval.index_build import (  # noqa: E402
    ExactTopK,
    array_source,
    build_index,
    choose_plan,
    default_nlist,
    parse_memory,
    recall_at_k,
    shards_source,
    two_level_centroids,
)

G = 1024**3


def clustered(n: int, d: int, centres: int = 20, noise: float = 0.25, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few centres: neighbours mean something (unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------ the plan
def test_parse_memory():
    assert parse_memory("4G") == 4 * G
    assert parse_memory("512M") == 512 * 1024**2
    assert parse_memory("1.5GB") == int(1.5 * G)
    assert parse_memory("2GiB") == 2 * G
    assert parse_memory(1000) == 1000
    for bad in ("lots", "-1G", "0", ""):
        with pytest.raises(UserError, match="--max-index-memory"):
            parse_memory(bad)


def test_auto_follows_autofaiss_rule():
    # below 1,000 vectors: exact; below 10,000: HNSW
    assert choose_plan(999, 512).kind == "flat"
    assert (choose_plan(5_000, 512).kind, choose_plan(5_000, 512).hnsw_m) == ("hnsw", 16)
    # 100k x 512 in 4 GiB: M = (4 GiB / (4 x 100k) - 512) / 2 = 5,112 links affordable, capped at 32
    assert (choose_plan(100_000, 512, "4G").kind, choose_plan(100_000, 512, "4G").hnsw_m) == ("hnsw", 32)
    # 1M x 512 in 2 GiB: (2 GiB / 4M - 512) / 2 = 12.4 -> HNSW12
    p = choose_plan(1_000_000, 512, "2G")
    assert (p.kind, p.hnsw_m) == ("hnsw", 12)
    # 500k x 128 in 270 MiB (283 MB): M = (283 MB / 2M - 128) / 2 = 6 < 8, no HNSW; IVF-Flat needs
    # 500k x (512 + 8) + 2048 lists x 512 = 261 MB: fits (4 sqrt(500k) = 2828 -> 2048 lists)
    p = choose_plan(500_000, 128, "270M")
    assert (p.kind, p.nlist) == ("ivf", 2048) and default_nlist(500_000) == 2048
    # 10M x 512 in 1 GiB: OPQ + IVF-PQ with the largest code that fits: (64 + 8) x 10M = 720 MB (+ lists);
    # 65,536 lists are found through an HNSW graph over the centroids, as autofaiss builds it
    p = choose_plan(10_000_000, 512, "1G")
    assert p.factory() == "OPQ64_448,IVF65536_HNSW32,PQ64x8"
    assert p.index_bytes(10_000_000) <= G
    # in 4 GiB the 256-byte code fits: (256 + 8) x 10M + 65,536 x (4 x 512 + 256) + 4 x 256 x 512 (codebooks)
    # = 2.79 GB; sub-vectors of 512 / 256 = 2 dims, below OPQ_MIN_SUBDIM (4), so no rotation (our deviation from
    # autofaiss: OPQ's training would be most of the build); a 6-bit scalar quantizer would fit too, but auto never
    # picks one (SQ_BITS)
    p = choose_plan(10_000_000, 512, "4G")
    assert (p.factory(), p.index_bytes(10_000_000)) == ("IVF65536_HNSW32,PQ256x8", 2_791_519_232)
    # asked for: (384 + 8) x 10M + 65,536 x 2,304 (lists) + 8 x 512 (ranges) = 4.07 GB
    p = choose_plan(10_000_000, 512, "4G", kind="ivfsq", sq_bits=6)
    assert (p.factory(), p.sq_bytes, p.index_bytes(10_000_000)) == ("IVF65536_HNSW32,SQ6", 384, 4_070_999_040)
    with pytest.raises(UserError, match="--sq-bits applies to --index ivfsq, not auto"):
        choose_plan(10_000_000, 512, "4G", sq_bits=6)
    assert choose_plan(10_000_000, 512, "1500M").factory() == "OPQ128_640,IVF65536_HNSW32,PQ128x8"  # 4 dims
    # nothing fits: one line with the smallest index's size
    with pytest.raises(UserError, match=r"too small for 10000000 vectors of dimension 512: the smallest index \(OPQ4_"):
        choose_plan(10_000_000, 512, "50M")


def test_nlist_rule_and_overrides():
    assert default_nlist(100_000) == 1024  # 4 sqrt(1e5) = 1265 -> nearest power of two
    assert default_nlist(5_000_000) == 16_384
    assert default_nlist(20_000_000) == 65_536
    assert default_nlist(1_000) == 25  # at most n / 39 points per list
    # 4 sqrt(50k) = 894 -> 1024 lists; the largest code <= d / 4 that divides 64: 16 bytes
    assert choose_plan(50_000, 64, kind="ivfpq").factory() == "IVF1024,PQ16x8"
    assert choose_plan(50_000, 64, kind="opq_ivfpq", nlist=64, pq_m=8).factory() == "OPQ8_56,IVF64,PQ8x8"
    # from 4,096 lists on the coarse quantizer is an HNSW graph (a flat one costs nlist x d per vector added)
    assert choose_plan(50_000, 64, kind="ivf", nlist=2048).factory() == "IVF2048,Flat"
    assert choose_plan(500_000, 64, kind="ivfpq", nlist=4096).factory() == "IVF4096_HNSW32,PQ16x8"
    with pytest.raises(UserError, match="must divide the dimension"):
        choose_plan(50_000, 60, kind="ivfpq", pq_m=16)
    assert choose_plan(50_000, 64, kind="ivfsq").factory() == "IVF1024,SQ8"  # 8 bits unless told
    assert choose_plan(50_000, 60, kind="ivfsq", sq_bits=6).sq_bytes == 45  # 60 x 6 / 8
    assert choose_plan(50_000, 61, kind="ivfsq", sq_bits=4).sq_bytes == 31  # 30.5 bytes, rounded up
    with pytest.raises(UserError, match="--sq-bits must be 4, 6 or 8, got 5"):
        choose_plan(50_000, 64, kind="ivfsq", sq_bits=5)
    with pytest.raises(UserError, match="unknown index kind 'lsh'"):
        choose_plan(50_000, 64, kind="lsh")
    with pytest.raises(UserError, match="larger than the number of vectors"):
        choose_plan(100, 8, kind="ivf", nlist=200)


# ------------------------------------------------------------------------------------------ exactness
def test_exact_topk_over_chunks_equals_brute_force():
    x = clustered(5_000, 16, seed=1)
    q = clustered(7, 16, seed=2)
    t = ExactTopK(q, 11)
    for s in range(0, len(x), 777):
        t.update(x[s : s + 777])
    sims = q @ x.T
    want = np.argsort(-sims, axis=1, kind="stable")[:, :11]
    np.testing.assert_array_equal(t.i, want)
    np.testing.assert_allclose(t.v, np.take_along_axis(sims, want, 1), rtol=1e-6)


def test_recall_leaves_the_query_row_out():
    exact = np.array([[5, 1, 2, 3], [0, 9, 8, 7]])
    found = np.array([[5, 1, 9, 3], [9, 8, 0, 6]])
    # query 0 is row 5: exact 1, 2, 3 vs found 1, 9, 3 -> 2 of 3; query 1 is row 0: 9, 8, 7 vs 9, 8, 6 -> 2 of 3
    assert recall_at_k(found, exact, np.array([5, 0]), k=3) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------ building
def test_flat_build_equals_exact_index(tmp_path):
    x = clustered(600, 16)
    r = build_index(array_source(x, 100), tmp_path / "flat", kind="auto")
    assert r.meta["kind"] == "flat" and r.meta["recall_at_10"] == 1.0 and not r.meta["approximate"]
    ix = EmbeddingIndex.load(tmp_path / "flat", use_gpu=False)
    ref = EmbeddingIndex(16, "flat", "torch", device="cpu").add(x)
    q = clustered(5, 16, seed=3)
    np.testing.assert_array_equal(ix.search(q, 10)[1], ref.search(q, 10)[1])


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfsq", "ivfpq", "opq_ivfpq"])
def test_each_kind_builds_loads_and_reports_its_measured_recall(tmp_path, kind):
    x = clustered(3_000, 16)
    kw = {"nlist": 16} if kind != "hnsw" else {}
    if kind in ("ivfpq", "opq_ivfpq"):
        kw["pq_m"] = 8
    r = build_index(array_source(x, 500), tmp_path / kind, kind=kind, queries=100, max_train=2_000, **kw)
    m = json.loads((tmp_path / kind / "index.json").read_text())
    assert m["kind"] == kind and m["approximate"] and m["recall_queries"] == 100 and m["ntotal"] == 3_000
    assert m == json.loads(json.dumps(r.meta))
    ix = EmbeddingIndex.load(tmp_path / kind, use_gpu=False)
    assert ix.approximate and ix.recall == m["recall_at_10"]
    # the recall written is the one measured: recompute it with the exact search of the same held-out rows
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(3_000, size=min(3_000, r.meta["train_vectors"] + 100), replace=False)[:100])
    _, found = ix.search(x[rows], 11)
    exact = np.argsort(-(x[rows] @ x.T), axis=1, kind="stable")[:, :11]
    assert recall_at_k(found, exact, rows) == pytest.approx(m["recall_at_10"], abs=1e-4)
    knob = "ef" if kind == "hnsw" else "nprobe"
    chosen = m["ef_search"] if kind == "hnsw" else m["nprobe"]
    sw = [(s[knob], s["recall_at_10"]) for s in m["recall_sweep"]]
    if m["recall_at_10"] < m["target_recall"]:  # to its end, or stopped where two doublings gained < 0.005
        assert sw[-1][0] == (1024 if kind == "hnsw" else 16) or (m["recall_plateau"] and sw[-1][1] - sw[-3][1] < 0.005)
        best = max(r for _, r in sw)  # the smallest setting within 0.005 of the best
        assert chosen == next(v for v, r in sw if r >= best - 0.005)
    else:
        assert sw[-1][0] == chosen and not m["recall_plateau"]


def test_a_recall_the_codes_cap_stops_the_sweep_and_says_so(tmp_path):
    # PQ with 2 one-byte codes of 16-d vectors cannot rank the 10 nearest of clustered vectors: recall@10 stops
    # growing long before every list is probed; the sweep stops there and keeps the smallest nprobe within reach
    x = clustered(4_000, 16, centres=8, noise=0.5)
    said: list[str] = []
    r = build_index(
        array_source(x, 1_000), tmp_path / "pq", kind="ivfpq", nlist=64, pq_m=2, queries=100, log=said.append
    )
    m, sw = r.meta, r.meta["recall_sweep"]
    assert m["recall_at_10"] < 0.9 and m["recall_plateau"]
    assert len(sw) < 7 and sw[-1]["nprobe"] < 64  # 1, 2, 4, ... stopped before nlist
    assert sw[-1]["recall_at_10"] - sw[-3]["recall_at_10"] < 0.005
    best = max(s["recall_at_10"] for s in sw)
    assert m["nprobe"] == next(s["nprobe"] for s in sw if s["recall_at_10"] >= best - 0.005)
    assert any("recall@10 stops at" in s and "the PQ codes limit it" in s for s in said)


@pytest.mark.parametrize("kind", ["ivf", "opq_ivfpq"])
def test_many_lists_train_two_level_and_search_through_an_hnsw_quantizer(tmp_path, kind):
    # 4,096 lists: two-level k-means (64 clusters, then each split), centroids in an HNSW graph; 25k x 16
    x = clustered(25_000, 16, centres=200, noise=0.3)
    kw = {"pq_m": 8, "max_train": 6_000} if kind == "opq_ivfpq" else {}
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # faiss's OpenMP OPQ training crawls on cores other tests keep busy
    try:
        r = build_index(array_source(x, 5_000), tmp_path / kind, kind=kind, nlist=4096, queries=200, **kw)
    finally:
        faiss.omp_set_num_threads(threads)
    assert "IVF4096_HNSW32" in r.meta["factory"]
    # no floor of 39 points per list (two-level k-means): every row but the held-out queries, or max_train
    assert r.meta["train_vectors"] == (25_000 - 200 if kind == "ivf" else 6_000)
    m = json.loads((tmp_path / kind / "index.json").read_text())
    _check(tmp_path / kind, m)  # the file check reads the HNSW quantizer's graph
    whole = faiss.read_index(str(tmp_path / kind / "index.faiss"))  # kept: the parts below point into it
    ivf = faiss.extract_index_ivf(whole)
    q = faiss.downcast_index(ivf.quantizer)
    assert isinstance(q, faiss.IndexHNSWFlat) and q.ntotal == 4096 and q.metric_type == faiss.METRIC_INNER_PRODUCT
    assert q.hnsw.efSearch == 128  # searched with efSearch 128 (the vectors were added with faiss's default, 16)
    # every centroid is a unit vector (spherical k-means: the vectors are compared by inner product)
    c = q.storage.reconstruct_n(0, 4096)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-4)
    ix = EmbeddingIndex.load(tmp_path / kind, use_gpu=False)
    assert ix.recall == m["recall_at_10"]
    if kind == "ivf":  # the sweep reached the target; every list visited: the exact answer
        assert m["recall_at_10"] >= 0.9 and m["nprobe"] < 4096
        ix.set_search_params(nprobe=4096)
        ref = EmbeddingIndex(16, "flat", "torch", device="cpu").add(x)
        qv = clustered(6, 16, centres=200, noise=0.3, seed=4)
        np.testing.assert_array_equal(ix.search(qv, 10)[1], ref.search(qv, 10)[1])


def test_two_level_centroids_are_faiss_where_it_works_and_complete_where_it_fails(tmp_path):
    from faiss.contrib.clustering import two_level_clustering

    x = clustered(5_000, 16, centres=40, noise=0.3)
    ref, _ = two_level_clustering(x, 8, 64, seed=3, spherical=True, verbose=False, min_points_per_centroid=1)
    np.testing.assert_array_equal(two_level_centroids(x, 64, seed=3), ref)
    # 64 tight clusters, 4,096 lists: faiss's version gives a first-level cluster no sub-cluster and asserts
    y = clustered(30_000, 64, centres=64, noise=0.2, seed=6)
    with pytest.raises(RuntimeError, match=r"clus\.k > 0"):
        two_level_clustering(y, 64, 4096, seed=0, spherical=True, verbose=False, min_points_per_centroid=1)
    c = two_level_centroids(y, 4096)
    assert c.shape == (4096, 64) and np.isfinite(c).all()
    r = build_index(array_source(y, 10_000), tmp_path / "i", kind="ivf", nlist=4096, queries=100)
    assert r.meta["ntotal"] == 30_000 and r.meta["recall_at_10"] >= 0.9


def test_search_params_are_checked_and_applied(tmp_path):
    x = clustered(2_000, 16)
    build_index(array_source(x), tmp_path / "ivf", kind="ivf", nlist=16, queries=50)
    ix = EmbeddingIndex.load(tmp_path / "ivf", use_gpu=False)
    with pytest.raises(UserError, match="--ef applies to hnsw indexes; this one is ivf"):
        ix.set_search_params(ef=32)
    with pytest.raises(UserError, match="--nprobe 17 is larger than the index's 16 lists"):
        ix.set_search_params(nprobe=17)
    ix.set_search_params(nprobe=16)  # every list: exact
    ref = EmbeddingIndex(16, "flat", "torch", device="cpu").add(x)
    q = clustered(4, 16, seed=5)
    np.testing.assert_array_equal(ix.search(q, 10)[1], ref.search(q, 10)[1])


@pytest.mark.parametrize("kind", ["ivfpq", "ivfsq"])
def test_on_disk_lists_equal_in_memory_lists_and_bytes_repeat(tmp_path, kind):
    x = clustered(4_000, 16)
    codes = {"pq_m": 8} if kind == "ivfpq" else {"sq_bits": 6}
    common = dict(kind=kind, nlist=32, queries=100, max_train=2_000, **codes)
    mem = build_index(array_source(x, 700), tmp_path / "mem", **common).meta
    disk = build_index(array_source(x, 700), tmp_path / "disk", on_disk=True, block_rows=1_500, **common).meta
    again = build_index(array_source(x, 700), tmp_path / "again", **common).meta
    assert (tmp_path / "mem" / "index.faiss").read_bytes() == (tmp_path / "again" / "index.faiss").read_bytes()
    assert disk["on_disk"] and (tmp_path / "disk" / "index.ivfdata").is_file()
    assert disk["recall_sweep"] == mem["recall_sweep"] == again["recall_sweep"]
    a = EmbeddingIndex.load(tmp_path / "mem", use_gpu=False)
    b = EmbeddingIndex.load(tmp_path / "disk", use_gpu=False)
    assert b.on_disk and not a.on_disk
    q = clustered(8, 16, seed=9)
    for ix in (a, b):
        ix.set_search_params(nprobe=8)
    sa, ia = a.search(q, 10)
    sb, ib = b.search(q, 10)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, rtol=1e-6)


def _disk_index(tmp_path):
    x = clustered(2_000, 8)
    d = tmp_path / "disk"
    build_index(array_source(x), d, kind="ivfpq", nlist=8, pq_m=4, queries=20, on_disk=True, block_rows=900)
    return d, json.loads((d / "index.json").read_text())


def _check(d, m):
    check_faiss_file(d / "index.faiss", m["kind"], m["dim"], m["ntotal"], m["nlist"], m["pq_m"], m["opq_dim"],
                     d / "index.ivfdata" if m["on_disk"] else None, m.get("sq_bits", 0))  # fmt: skip


def test_hostile_on_disk_lists_are_refused_before_faiss_maps_them(tmp_path, monkeypatch):
    d, m = _disk_index(tmp_path)
    _check(d, m)
    data, index = (d / "index.ivfdata").read_bytes(), (d / "index.faiss").read_bytes()
    monkeypatch.setattr(faiss, "read_index", lambda *a, **k: pytest.fail("faiss.read_index reached"))

    def refused(match):
        with pytest.raises(UserError, match=match):
            EmbeddingIndex.load(d, use_gpu=False)
        (d / "index.ivfdata").write_bytes(data)
        (d / "index.faiss").write_bytes(index)

    (d / "index.ivfdata").write_bytes(data[:-100])  # cut short: faiss would map past the end (SIGBUS)
    refused(r"index\.ivfdata holds \d+ bytes, the index says")
    (d / "index.ivfdata").unlink()
    refused(r"lists' file .*index\.ivfdata is missing")
    # the first list's id (right after its codes) set to 10**9: a vector that does not exist
    off = index.index(b"ilod") + 4 + 16 + 8  # fourcc, nlist, code size, the lists' count
    size, cap, start = np.frombuffer(index[off : off + 24], "<u8")
    assert size > 0
    pos = int(start + cap * 4)
    (d / "index.ivfdata").write_bytes(data[:pos] + (10**9).to_bytes(8, "little") + data[pos + 8 :])
    refused(r"on-disk list 0 holds ids outside \[0, 2000\)")
    # the first list's offset moved past the end of the data file
    (d / "index.faiss").write_bytes(index[: off + 16] + (len(data)).to_bytes(8, "little") + index[off + 24 :])
    refused("reach past the end of index.ivfdata")
    # the index names another file for its lists
    (d / "index.faiss").write_bytes(index.replace(b"index.ivfdata", b"/etc/passwd00"))
    refused(r"lists live in b'/etc/passwd00', not in index\.ivfdata")
    # index.json says in-memory lists for an on-disk index
    meta = d / "index.json"
    good = meta.read_text()
    meta.write_text(json.dumps({**m, "on_disk": False}))
    refused("inverted lists are on disk, index.json says they are not")
    meta.write_text(json.dumps({**m, "on_disk": "yes"}))
    refused("key 'on_disk' has an invalid value 'yes'")
    meta.write_text(json.dumps({**m, "pq_m": 8}))
    refused(r"is not the 8-byte, 8-bit quantizer")
    meta.write_text(good)


@pytest.mark.parametrize("kind", ["opq_ivfpq", "ivfsq"])
def test_every_4_byte_overwrite_of_a_quantized_index_is_refused_or_harmless(tmp_path, kind):
    x = clustered(1_500, 8)
    d = tmp_path / kind
    codes = {"pq_m": 4} if kind == "opq_ivfpq" else {"sq_bits": 6}
    build_index(array_source(x), d, kind=kind, nlist=4, queries=10, max_train=1_200, **codes)
    m = json.loads((d / "index.json").read_text())
    orig = (d / "index.faiss").read_bytes()
    bad = tmp_path / "bad.faiss"
    refused = 0
    for off in range(0, 600):
        data = orig[:off] + b"\xff\xff\xff\x7f" + orig[off + 4 :]
        bad.write_bytes(data)
        try:
            check_faiss_file(bad, kind, 8, m["ntotal"], m["nlist"], m["pq_m"], m["opq_dim"], None, m["sq_bits"])
        except UserError:
            refused += 1
            continue
        idx = faiss.read_index(str(bad))
        _, ids = idx.search(x[:3], 5)
        assert ids.max() < m["ntotal"], off
    assert refused >= 100


def test_an_sq_index_whose_json_disagrees_with_its_file_is_refused(tmp_path):
    x = clustered(1_500, 8)
    d = tmp_path / "sq"
    build_index(array_source(x), d, kind="ivfsq", nlist=4, sq_bits=6, queries=10)
    meta = d / "index.json"
    m = json.loads(meta.read_text())
    assert (m["sq_bits"], m["factory"]) == (6, "IVF4,SQ6")
    for bad, match in (
        ({"sq_bits": 8}, r"type 6, d 8, code size 6\) is not the 8-bit quantizer"),  # 8 x 6 / 8 = 6 bytes
        ({"sq_bits": 5}, "an ivfsq index needs 'sq_bits' of 4, 6 or 8, got 5"),
        ({"sq_bits": None}, "an ivfsq index needs 'sq_bits' of 4, 6 or 8, got 0"),
        ({"kind": "ivfpq", "pq_m": 6}, r"index type b'IwSq' is not the ivfpq index"),
    ):
        meta.write_text(json.dumps({**m, **bad}))
        with pytest.raises(UserError, match=match):
            EmbeddingIndex.load(d, use_gpu=False)
    meta.write_text(json.dumps(m))
    ix = EmbeddingIndex.load(d, use_gpu=False)
    ix.set_search_params(nprobe=4)  # every list: only the 6-bit codes stand between it and the exact answer
    exact = np.argsort(-(x[:50] @ x.T), axis=1, kind="stable")[:, :11]
    # 6 bits on 8-d vectors 75 to a cluster: 0.744 measured (8 bits: 0.92); a misread code would be near 0.01
    assert recall_at_k(ix.search(x[:50], 11)[1], exact, np.arange(50)) >= 0.7


# ------------------------------------------------------------------------------------------ shards
def _shards(out, x, size=400):
    from simsiam_kit.retrieval.shards import ShardWriter, shard_range

    w = ShardWriter(out, dim=x.shape[1], shard_size=size, fingerprint={"model_sha256": "t"}, total=len(x))
    for i in w.todo():
        a, b = shard_range(i, size, len(x))
        cols = {"row": np.arange(a, b), "id": [f"{r}.jpg" for r in range(a, b)], "label": np.full(b - a, -1),
                "width": np.full(b - a, 8), "height": np.full(b - a, 8)}  # fmt: skip
        w.write_shard(i, x[a:b], cols, inputs=b - a)
    w.close()


def test_build_from_shards_verifies_checksums(tmp_path):
    x = clustered(1_000, 8)
    _shards(tmp_path / "emb", x)
    src = shards_source(tmp_path / "emb")
    assert (src.n, src.dim) == (1_000, 8)
    build_index(src, tmp_path / "emb", kind="flat")
    ix = EmbeddingIndex.load(tmp_path / "emb", use_gpu=False)
    np.testing.assert_array_equal(ix.search(x[:3], 1)[1][:, 0], [0, 1, 2])
    shard = tmp_path / "emb" / "shards" / "00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1  # one bit of the last vector
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="corrupt shard 00001: .*00001.npy does not match its sha256"):
        build_index(shards_source(tmp_path / "emb"), tmp_path / "emb", kind="flat")
    assert (tmp_path / "emb" / "index.json").is_file()  # the previous index is untouched


def test_incomplete_shards_are_refused(tmp_path):
    from simsiam_kit.retrieval.shards import ShardWriter

    ShardWriter(tmp_path / "e", dim=8, shard_size=10, total=30).close()
    with pytest.raises(UserError, match="not complete; finish them with `simsiam-kit embed --resume`"):
        shards_source(tmp_path / "e")
    with pytest.raises(UserError, match="no manifest.json"):
        shards_source(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------ SIGKILL
BUILD = """
import sys, time
import numpy as np
sys.path.insert(0, {tests!r})
from retrieval_index_build_data import data
from simsiam_kit.retrieval.index_build import VectorSource, build_index
x = data()
slow = {slow}
def chunks():
    for s in range(0, len(x), 500):
        if slow and s >= 1500:
            print("adding", s, flush=True)
            time.sleep(0.2)
        yield x[s : s + 500]
build_index(VectorSource(chunks, len(x), x.shape[1]), sys.argv[1], kind="ivfpq", nlist=16, pq_m=8,
            queries=50, max_train=2000, on_disk=True, block_rows=1000)
"""


def test_sigkilled_build_leaves_no_index_and_a_rerun_gives_the_same_bytes(tmp_path):
    (tmp_path / "retrieval_index_build_data.py").write_text(
        "import numpy as np\n"
        "def data():\n"
        "    rng = np.random.default_rng(0)\n"
        "    c = rng.standard_normal((20, 16)).astype(np.float32)\n"
        "    x = c[rng.integers(0, 20, 4000)] + 0.25 * rng.standard_normal((4000, 16)).astype(np.float32)\n"
        "    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def script(slow):
        p = tmp_path / f"build{int(slow)}.py"
        p.write_text(textwrap.dedent(BUILD.format(tests=str(tmp_path), slow=slow)))
        return p

    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run([sys.executable, str(script(False)), str(ref)], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([sys.executable, str(script(True)), str(out)], env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # killed while adding, after two blocks were written to disk
        if line.startswith("adding 2500"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists() and not (out / "index.faiss").exists()
    assert list(out.glob(".index-build-*"))  # the killed build's temporary directory
    deadline = time.time() + 120
    subprocess.run([sys.executable, str(script(False)), str(out)], check=True, env=env, capture_output=True)
    assert time.time() < deadline
    assert not list(out.glob(".index-build-*"))
    for name in ("index.faiss", "index.ivfdata"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    a, b = (json.loads((d / "index.json").read_text()) for d in (ref, out))
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_build_sigkilled_at_random_moments_ends_as_an_uninterrupted_build(tmp_path):
    """A build killed at seeded random moments of its work (after its imports: training, adding, merging,
    committing), each time continued by the next run into the same directory, until 3 kills landed inside a build
    (its temporary directory left): after every kill the directory holds no index.json, or a complete one equal to
    the uninterrupted build's; the last run ends byte for byte as that build."""
    import random

    (tmp_path / "retrieval_index_build_data.py").write_text(
        "import numpy as np\n"
        "def data():\n"
        "    rng = np.random.default_rng(1)\n"
        "    c = rng.standard_normal((20, 16)).astype(np.float32)\n"
        "    x = c[rng.integers(0, 20, 4000)] + 0.25 * rng.standard_normal((4000, 16)).astype(np.float32)\n"
        "    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "build.py"
    code = textwrap.dedent(BUILD.format(tests=str(tmp_path), slow=False))
    script.write_text(code.replace("x = data()\n", "x = data()\nprint('ready', flush=True)\n"))

    def start(directory):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(directory)], env=env, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    ref, out = tmp_path / "ref", tmp_path / "out"
    proc = start(ref)
    t0 = time.perf_counter()
    assert proc.wait() == 0
    work = time.perf_counter() - t0  # the build itself, imports excluded
    ref_bytes = {n: (ref / n).read_bytes() for n in ("index.faiss", "index.ivfdata")}
    ref_meta = {k: v for k, v in json.loads((ref / "index.json").read_text()).items() if k != "seconds"}
    rng = random.Random(25)
    inside = rounds = 0
    while inside < 3 and rounds < 12:  # until 3 kills landed inside the build (the others: after it finished)
        rounds += 1
        proc = start(out)
        time.sleep(rng.uniform(0.0, work))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        inside += bool(list(out.glob(".index-build-*")))  # killed mid-build: its temporary directory is left
        if (out / "index.json").exists():  # finished (or committed) before the kill: the uninterrupted build's
            assert {n: (out / n).read_bytes() for n in ref_bytes} == ref_bytes
    assert inside == 3, (inside, rounds, work)
    subprocess.run([sys.executable, str(script), str(out)], check=True, env=env, capture_output=True)
    assert not list(out.glob(".index-build-*"))
    assert {n: (out / n).read_bytes() for n in ref_bytes} == ref_bytes
    assert {k: v for k, v in json.loads((out / "index.json").read_text()).items() if k != "seconds"} == ref_meta


# ------------------------------------------------------------------------------------------ the command
def test_index_build_command(tmp_path):
    from helpers import cli

    x = clustered(2_000, 8)
    _shards(tmp_path / "emb", x)
    r = cli(
        "index", "build", "--embeddings", str(tmp_path / "emb"), "--index", "ivf", "--nlist", "8", "--queries", "50"
    )
    assert r.exit_code == 0, r.output
    assert "IVF8,Flat" in r.output and "recall@10 sweep on 50 held-out vectors: nprobe=1:" in r.output
    m = json.loads((tmp_path / "emb" / "index.json").read_text())
    assert m["kind"] == "ivf" and m["ntotal"] == 2_000 and m["recall_queries"] == 50
    ix = EmbeddingIndex.load(tmp_path / "emb", use_gpu=False)
    assert ix.describe().startswith(
        f"ivf index: approximate, recall@10 {m['recall_at_10']:.3f} measured on 50 held-out"
    )
    for args, msg in [
        (["--max-index-memory", "lots"], "--max-index-memory 'lots': expected a size such as 4G"),
        (["--index", "lsh"], "unknown index kind 'lsh'"),
    ]:
        r = cli("index", "build", "--embeddings", str(tmp_path / "emb"), *args)
        assert r.exit_code == 2 and msg in r.output, r.output
    r = cli("index", "build", "--embeddings", str(tmp_path / "none"))
    assert r.exit_code == 2 and "no such directory" in r.output
    # options judged before any shard is read: in a directory without shards they are named, not the missing manifest
    (tmp_path / "empty").mkdir()
    for args, msg in [
        (["--index", "ivfsq", "--sq-bits", "5"], "--sq-bits must be 4, 6 or 8, got 5"),
        (["--sq-bits", "6"], "--sq-bits applies to --index ivfsq, not auto"),
        (["--nlist", "0"], "--nlist must be a positive integer, got 0"),
    ]:
        r = cli("index", "build", "--embeddings", str(tmp_path / "empty"), *args)
        assert r.exit_code == 2 and msg in r.output, r.output


@pytest.mark.parametrize("kind", ["ivfpq", "opq_ivfpq"])
def test_embedding_index_builds_the_pq_kinds_in_memory_too(tmp_path, kind):
    """`embed --index ivfpq` goes through EmbeddingIndex.add (trained on the first batch): saved, checked, loaded."""
    x = clustered(2_000, 16)
    ix = EmbeddingIndex(16, kind, "faiss", nlist=8, use_gpu=False).add(x)
    # 4 code bytes (the largest <= d / 4 dividing 16); OPQ output (min(16 // 4, 6) + 1) x 4 = 20
    assert (ix.nlist, ix.pq_m) == (8, 4) and ix.opq_dim == (20 if kind == "opq_ivfpq" else 0)
    ix.save(tmp_path / kind)
    back = EmbeddingIndex.load(tmp_path / kind, use_gpu=False)
    assert back.approximate and back.recall is None and "recall not measured" in back.describe()
    np.testing.assert_array_equal(back.search(x[:5], 3)[1], ix.search(x[:5], 3)[1])


def test_search_command_takes_nprobe_and_states_the_recall(tmp_path):
    from PIL import Image

    from helpers import cli, conv_onnx_encoder, write_tiny_npz

    enc = conv_onnx_encoder(tmp_path / "enc.onnx", size=16, dim=8)
    npz = write_tiny_npz(tmp_path / "t.npz", n=400, size=16)
    emb = tmp_path / "emb"
    r = cli("embed", "--model", enc, "--data", npz, "--output", emb, "--workers", "0", "--no-progress")
    assert r.exit_code == 0, r.output
    r = cli("index", "build", "--embeddings", emb, "--index", "ivf", "--nlist", "8", "--queries", "40")
    assert r.exit_code == 0, r.output
    m = json.loads((emb / "index.json").read_text())
    Image.fromarray(np.load(npz)["images"][3]).save(tmp_path / "q.png")
    r = cli("search", "--index", emb, "--query", tmp_path / "q.png", "--k", "3", "--nprobe", "8")
    assert r.exit_code == 0, r.output
    assert f"ivf index: approximate, recall@10 {m['recall_at_10']:.3f} measured on 40 held-out vectors" in r.output
    assert "searching with nprobe=8" in r.output
    report = json.loads((emb / "search.json").read_text())
    assert report["approximate"] and report["search_params"] == {"nprobe": 8}
    assert report["results"][0]["neighbours"][0]["row"] == 3  # nprobe = nlist: exact, the image itself first
    r = cli("search", "--index", emb, "--query", tmp_path / "q.png", "--ef", "64")
    assert r.exit_code == 2 and "--ef applies to hnsw indexes; this one is ivf" in r.output
