"""The streaming embed pipeline (retrieval/pipeline.py) and the inputs at scale (data/webdataset.py): vectors equal
to today's one-image-at-a-time embed, the same shards for any number of workers, tar shards and path lists giving
the same rows as the folder they were made from, bad images counted and listed."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from simsiam_kit.data.datasets import load_dataset
from simsiam_kit.data.webdataset import TarShards, expand_braces
from simsiam_kit.errors import UserError
from simsiam_kit.export.embedder import OnnxEmbedder
from simsiam_kit.retrieval.embed_search import embed_dataset, load_embeddings_dir
from simsiam_kit.retrieval.pipeline import embed_to_dir
from simsiam_kit.retrieval.shards import iter_shards, read_manifest

from helpers import CIFAR_VAL, DATA, conv_onnx_encoder, need

COCO = DATA / "coco128_det" / "images"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return conv_onnx_encoder(tmp_path_factory.mktemp("enc") / "conv.onnx", size=8, dim=8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An ImageFolder of 12 real COCO photos (JPEG, assorted sizes) in two classes, 6 each."""
    files = sorted(need(COCO).glob("*.jpg"))[:12]
    root = tmp_path_factory.mktemp("photos") / "folder"
    for i, f in enumerate(files):
        d = root / ("a" if i < 6 else "b")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, d / f.name)
    return root


def _folder_files(root: Path) -> list[tuple[Path, int]]:
    return [
        (f, ci) for ci, c in enumerate(sorted(p.name for p in root.iterdir())) for f in sorted((root / c).iterdir())
    ]


def write_tars(root: Path, out: Path, per_tar: int = 5, corrupt: tuple = ()) -> list[Path]:
    """img2dataset-style tars (KEY.jpg, KEY.cls, KEY.json) of the folder's images, in the folder's order."""
    out.mkdir(parents=True, exist_ok=True)
    items = _folder_files(root)
    tars = []
    for t in range(0, len(items), per_tar):
        p = out / f"{t // per_tar:05d}.tar"
        with tarfile.open(p, "w") as tf:
            for k, (f, label) in enumerate(items[t : t + per_tar], start=t):
                key = f"{k:09d}"
                data = b"\xff\xd8 not a jpeg" if k in corrupt else f.read_bytes()
                for name, payload in (
                    (f"{key}.jpg", data),
                    (f"{key}.cls", str(label).encode()),
                    (f"{key}.json", json.dumps({"key": key, "url": f.name}).encode()),
                ):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
        tars.append(p)
    return tars


def _run(encoder, data, out, **kw):
    kw.setdefault("shard_size", 4)
    kw.setdefault("workers", 0)
    return embed_to_dir(OnnxEmbedder(encoder, batch_size=4), str(data), out, **kw)


# ----------------------------------------------------------------------------- parity with today's embed
@pytest.mark.parametrize("workers", [0, 2])
def test_npz_vectors_equal_todays_embed_bit_for_bit(encoder, tmp_path, workers):
    spec = f"{need(CIFAR_VAL)}[:40]"
    emb = OnnxEmbedder(encoder, batch_size=8)
    ref, rows = embed_dataset(emb, load_dataset(spec))  # the one-process loop `embed` ran before shards
    m = embed_to_dir(emb, spec, tmp_path / "e", shard_size=16, workers=workers)
    z = np.load(tmp_path / "e" / "embeddings.npy")
    assert z.dtype == np.float32 and np.array_equal(z, ref)
    assert json.loads((tmp_path / "e" / "ids.json").read_text()) == list(range(40))
    assert m["count"] == 40 and m["skipped"] == 0 and m["shards"]["shard_size"] == 16
    man = read_manifest(tmp_path / "e")
    assert man["complete"] and [(s.first_row, s.rows) for s in man["shards"]] == [(0, 16), (16, 16), (32, 8)]


def test_shards_are_the_same_bytes_for_any_number_of_workers(encoder, photos, tmp_path):
    _run(encoder, photos, tmp_path / "w0", workers=0)
    _run(encoder, photos, tmp_path / "w2", workers=2)
    for ext in ("npy", "parquet"):
        for i in range(3):
            a = (tmp_path / "w0" / "shards" / f"{i:05d}.{ext}").read_bytes()
            assert a == (tmp_path / "w2" / "shards" / f"{i:05d}.{ext}").read_bytes()


def test_folder_of_photos_table_and_search_layout(encoder, photos, tmp_path):
    emb = OnnxEmbedder(encoder, batch_size=4)
    ref, _ = embed_dataset(emb, load_dataset(str(photos)))
    _run(encoder, photos, tmp_path / "e")
    assert np.array_equal(np.load(tmp_path / "e" / "embeddings.npy"), ref)
    tables = [t for _, _, t in iter_shards(tmp_path / "e")]
    t = pa.concat_tables(tables)
    files = _folder_files(photos)
    assert t.column("row").to_pylist() == list(range(12))
    assert t.column("offset").to_pylist() == [0, 1, 2, 3] * 3
    assert t.column("id").to_pylist() == [f"{f.parent.name}/{f.name}" for f, _ in files]
    assert t.column("label").to_pylist() == [c for _, c in files]
    sizes = [Image.open(f).size for f, _ in files]
    assert list(zip(t.column("width").to_pylist(), t.column("height").to_pylist())) == sizes
    store = load_embeddings_dir(tmp_path / "e")  # what `search` and the HTTP service read
    assert store["ids"] == t.column("id").to_pylist() and store["index"].ntotal == 12
    assert store["labels"].tolist() == [c for _, c in files] and store["manifest"]["classes"] == ["a", "b"]


def test_float16_shards_search_layout_stays_float32(encoder, photos, tmp_path):
    _run(encoder, photos, tmp_path / "e", dtype="float16")
    z16 = np.concatenate([z for _, z, _ in iter_shards(tmp_path / "e")])
    z = np.load(tmp_path / "e" / "embeddings.npy")
    assert z16.dtype == np.float16 and z.dtype == np.float32
    assert np.array_equal(z, z16.astype(np.float32))


# ----------------------------------------------------------------------------- tar shards and path lists
def test_brace_expansion():
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad, msg in (("s/{3..1}.tar", "runs backwards"), ("s/{x}.tar", "expected"), ("s/{0..2.tar", "unbalanced")):
        with pytest.raises(UserError, match=msg):
            expand_braces(bad)


def test_tar_shards_give_the_folder_rows(encoder, photos, tmp_path):
    tars = write_tars(photos, tmp_path / "tars", per_tar=5)  # 5 + 5 + 2 samples: shards cross tar boundaries
    spec = str(tmp_path / "tars" / "{00000..00002}.tar")
    assert len(TarShards(spec)) == 12
    _run(encoder, photos, tmp_path / "folder")
    m = _run(encoder, spec, tmp_path / "tar")
    assert m["count"] == 12 and m["labels"] is True
    assert np.array_equal(np.load(tmp_path / "tar" / "embeddings.npy"), np.load(tmp_path / "folder" / "embeddings.npy"))
    assert np.array_equal(np.load(tmp_path / "tar" / "labels.npy"), np.load(tmp_path / "folder" / "labels.npy"))
    ids = json.loads((tmp_path / "tar" / "ids.json").read_text())
    assert ids[0] == f"{tars[0]}::000000000" and ids[11] == f"{tars[2]}::000000011"
    # a slice of the tar rows, as for any spec
    m = _run(encoder, spec + "[3:9]", tmp_path / "slice")
    assert np.array_equal(
        np.load(tmp_path / "slice" / "embeddings.npy"), np.load(tmp_path / "folder" / "embeddings.npy")[3:9]
    )


@pytest.mark.parametrize("kind", ["txt", "parquet"])
def test_path_lists_give_the_folder_rows(encoder, photos, tmp_path, kind):
    files = _folder_files(photos)
    lst = tmp_path / f"list.{kind}"
    if kind == "txt":  # relative paths are relative to the list's folder; labels after a tab; blank lines skipped
        lines = [f"{os.path.relpath(f, tmp_path)}\t{c}\n" for f, c in files]
        lst.write_text("".join(lines[:4]) + "\n" + "".join(lines[4:]))
    else:
        pq.write_table(pa.table({"path": [str(f) for f, _ in files], "label": [c for _, c in files]}), lst)
    _run(encoder, photos, tmp_path / "folder")
    _run(encoder, lst, tmp_path / "list")
    assert np.array_equal(
        np.load(tmp_path / "list" / "embeddings.npy"), np.load(tmp_path / "folder" / "embeddings.npy")
    )
    assert np.load(tmp_path / "list" / "labels.npy").tolist() == [c for _, c in files]
    ds = load_dataset(str(lst))  # the same spec works for every command that reads files (pretrain, eval)
    assert len(ds) == 12 and not ds.in_memory and ds.labels.tolist() == [c for _, c in files]


def test_bad_path_lists(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="lists no image paths"):
        load_dataset(str(tmp_path / "empty.txt"))
    (tmp_path / "missing.txt").write_text("nowhere.jpg\n")
    with pytest.raises(UserError, match=r"missing.txt: lists .*nowhere.jpg, which does not exist"):
        load_dataset(str(tmp_path / "missing.txt"))
    (tmp_path / "label.txt").write_text("a.jpg\tcat\n")
    with pytest.raises(UserError, match="line 1: label 'cat' is not an integer"):
        load_dataset(str(tmp_path / "label.txt"))
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "nopath.parquet")
    with pytest.raises(UserError, match="no column 'path'"):
        load_dataset(str(tmp_path / "nopath.parquet"))


def test_tar_spec_as_a_random_access_dataset(photos, tmp_path):
    """load_dataset on tar shards (what pretrain and the evaluations read): the folder's images, labels from .cls,
    ids TAR::KEY, a slice indexed without reading the other images."""
    write_tars(photos, tmp_path / "tars", per_tar=5)
    spec = str(tmp_path / "tars" / "{00000..00002}.tar")
    ds, ref = load_dataset(spec), load_dataset(str(photos))
    assert len(ds) == 12 and not ds.in_memory and ds.labels.tolist() == ref.labels.tolist()
    assert ds.ids[6] == f"{tmp_path / 'tars' / '00001.tar'}::000000006"
    for i in (0, 6, 11):
        assert np.array_equal(np.asarray(ds.load_pil(i)), np.asarray(ref.load_pil(i)))
    part = load_dataset(spec + "[4:7]")
    assert len(part) == 3 and part.ids == ds.ids[4:7]
    assert np.array_equal(np.asarray(part.load_pil(0)), np.asarray(ref.load_pil(4)))


def test_pretrain_reads_tar_shards(shared_tiny_npz, tmp_path):
    """A one-epoch pretraining run on tar shards of the tiny npz's 48 images (PNG, 2 workers), then resumed for a
    second epoch: the tar spec goes through the same loader as an ImageFolder."""
    from helpers import cli, tiny_overrides

    with np.load(shared_tiny_npz) as d:
        images, labels = d["images"], d["labels"]
    (tmp_path / "tars").mkdir()
    for t in range(2):
        with tarfile.open(tmp_path / "tars" / f"{t}.tar", "w") as tf:
            for k in range(t * 24, (t + 1) * 24):
                buf = io.BytesIO()
                Image.fromarray(images[k]).save(buf, "PNG")
                for name, payload in ((f"{k:04d}.png", buf.getvalue()), (f"{k:04d}.cls", str(labels[k]).encode())):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
    spec = str(tmp_path / "tars" / "{0..1}.tar")
    r = cli("pretrain", "--output", tmp_path / "run", sets=tiny_overrides(spec, spec))
    assert r.exit_code == 0, r.output
    r = cli("pretrain", "--output", tmp_path / "run", "--resume", sets=["optim.epochs=2"])
    assert r.exit_code == 0, r.output
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {1, 2} <= {e["epoch"] for e in epochs if "epoch" in e and "knn_top1" in e}  # (0: the random-init kNN)


# ----------------------------------------------------------------------------- bad images
def test_corrupt_image_inside_a_tar(encoder, photos, tmp_path):
    write_tars(photos, tmp_path / "tars", per_tar=6, corrupt=(7,))
    spec = str(tmp_path / "tars" / "{00000..00001}.tar")
    with pytest.raises(UserError, match=r"^cannot read image .*00001.tar::000000007") as e:
        _run(encoder, spec, tmp_path / "strict")
    assert e.value.remedy == "skip_bad_images"  # the command names its option (cli/common.py)
    m = _run(encoder, spec, tmp_path / "skip", skip_bad_images=True)
    assert m["count"] == 11 and m["skipped"] == 1
    assert m["skipped_images"][0]["row"] == 7 and m["skipped_images"][0]["id"].endswith("00001.tar::000000007")
    man = read_manifest(tmp_path / "skip")
    assert [(s.inputs, s.rows) for s in man["shards"]] == [(4, 4), (4, 3), (4, 4)]
    assert man["shards"][1].skipped[0]["row"] == 7
    rows = pa.concat_tables([t for _, _, t in iter_shards(tmp_path / "skip")]).column("row").to_pylist()
    assert rows == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11]
    _run(encoder, photos, tmp_path / "folder")
    full = np.load(tmp_path / "folder" / "embeddings.npy")
    assert np.array_equal(np.load(tmp_path / "skip" / "embeddings.npy"), np.delete(full, 7, axis=0))


def test_a_tar_cut_short(encoder, photos, tmp_path):
    tars = write_tars(photos, tmp_path / "tars", per_tar=6)
    data = tars[1].read_bytes()
    tars[1].write_bytes(data[: len(data) // 2])  # a download cut in the middle of a member
    spec = str(tmp_path / "tars" / "{00000..00001}.tar")
    with pytest.raises(UserError, match=r"00001.tar: member .* runs past the end of the file .* complete samples") as e:
        _run(encoder, spec, tmp_path / "strict")
    assert e.value.remedy == "skip_bad_images"
    n_ok = len(TarShards(spec, skip_bad=True))
    assert 6 <= n_ok < 12
    m = _run(encoder, spec, tmp_path / "skip", skip_bad_images=True)
    assert m["count"] == n_ok and m["damaged_inputs"][0]["tar"] == str(tars[1])
    _run(encoder, photos, tmp_path / "folder")
    assert np.array_equal(
        np.load(tmp_path / "skip" / "embeddings.npy"), np.load(tmp_path / "folder" / "embeddings.npy")[:n_ok]
    )
    # cut exactly between members: no member runs past the end, but the end-of-archive block is missing
    tars[1].write_bytes(data)
    with tarfile.open(tars[1]) as tf:
        cut = tf.getmember("000000008.jpg").offset
    tars[1].write_bytes(data[:cut])
    with pytest.raises(UserError, match="no end-of-archive block"):
        TarShards(spec)


# ----------------------------------------------------------------------------- the torch runtime
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_torch_runtime_matches_the_onnx_model(encoder, photos, tmp_path, precision):
    """The torch module of helpers.conv_onnx_encoder (same weights), with the ONNX model's preprocessing: the same
    rows, embeddings equal to 1e-5 in fp32 (bf16 where the CPU has it: to 2e-2)."""
    import functools

    import torch

    from simsiam_kit.export.embedder import preprocess
    from simsiam_kit.retrieval.torch_runtime import TorchEmbedder

    onnx_emb = OnnxEmbedder(encoder)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)))
    module = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    emb = TorchEmbedder(
        module,
        {"arch": "conv-pool", "head": "backbone", "embedding_dim": 8, "image_size": 8},
        encoder,
        functools.partial(preprocess, image_size=8, mean=onnx_emb.mean, std=onnx_emb.std),
        batch_size=4,
        device="cpu",
        precision=precision,
    )
    _run(encoder, photos, tmp_path / "onnx")
    m = embed_to_dir(emb, str(photos), tmp_path / "torch", shard_size=4, workers=0)
    assert m["runtime"].startswith(f"torch-{emb.precision.name}")
    tol = 1e-5 if emb.precision.name == "fp32" else 2e-2
    a, b = np.load(tmp_path / "onnx" / "embeddings.npy"), np.load(tmp_path / "torch" / "embeddings.npy")
    assert a.shape == b.shape and np.abs(a - b).max() < tol
    assert (tmp_path / "onnx" / "ids.json").read_text() == (tmp_path / "torch" / "ids.json").read_text()


def _cifar_tars(out: Path, n: int, per_tar: int) -> str:
    """``n`` real CIFAR val images as PNG samples in tars of ``per_tar``; returns the brace spec."""
    with np.load(need(CIFAR_VAL)) as d:
        images, labels = d["images"][:n], d["labels"][:n]
    out.mkdir(parents=True)
    n_tars = -(-n // per_tar)
    for t in range(n_tars):
        with tarfile.open(out / f"{t:03d}.tar", "w") as tf:
            for k in range(t * per_tar, min(n, (t + 1) * per_tar)):
                buf = io.BytesIO()
                Image.fromarray(images[k]).save(buf, "PNG")
                for name, payload in ((f"{k:06d}.png", buf.getvalue()), (f"{k:06d}.cls", str(labels[k]).encode())):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
    return str(out / f"{{000..{n_tars - 1:03d}}}.tar")


def test_pipeline_memory_does_not_grow_with_the_number_of_images(encoder, tmp_path):
    """Peak traced allocation of the whole embed (index "none") over 640 tar images is that of 64 plus the manifest
    entries of the extra shards: nothing is kept per image. Kept, 576 more rows would add their embeddings, ids,
    tables and 576 decoded images (each 32 x 32 x 3 bytes + its 8 x 8 float32 input), about 2 MB."""
    import tracemalloc

    emb = OnnxEmbedder(encoder, batch_size=8)

    def peak(n: int) -> int:
        spec = _cifar_tars(tmp_path / f"t{n}", n, per_tar=64)
        tracemalloc.start()
        embed_to_dir(emb, spec, tmp_path / f"e{n}", index_kind="none", shard_size=16, workers=0)
        got = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert read_manifest(tmp_path / f"e{n}")["complete"]
        return got

    peak(16)  # first use: lazy imports and caches, not the run's own memory
    small, large = peak(64), peak(640)
    extra_shards = (640 - 64) // 16
    assert large - small < extra_shards * 3000 + 200_000, (small, large)


def test_index_none_writes_shards_only_and_search_says_so(encoder, photos, tmp_path):
    from simsiam_kit.retrieval.embed_search import search_images

    m = _run(encoder, photos, tmp_path / "e", index_kind="none")
    assert m["index"] is None and m["count"] == 12
    assert not (tmp_path / "e" / "embeddings.npy").exists() and not (tmp_path / "e" / "ids.json").exists()
    assert read_manifest(tmp_path / "e")["complete"]
    with pytest.raises(UserError, match="embedded with --index none"):
        search_images(tmp_path / "e", next(photos.rglob("*.jpg")), OnnxEmbedder)


def test_a_directory_of_the_previous_layout_is_rewritten(encoder, photos, tmp_path):
    """A directory written before shards (embeddings.npy, ids.json, embed.json, no manifest.json) is replaced as
    before, with no --resume needed."""
    out = tmp_path / "e"
    out.mkdir()
    (out / "embed.json").write_text("{}")
    (out / "labels.npy").write_bytes(b"stale")
    m = _run(encoder, photos / "a", out)  # a flat folder of 6 unlabelled photos
    assert m["count"] == 6 and m["labels"] is False and not (out / "labels.npy").exists()
    assert len(json.loads((out / "ids.json").read_text())) == 6


def test_one_shard_at_a_time_gives_the_pipelines_files(encoder, photos, tmp_path):
    """embed_one_shard (the unit of a distributed run) + ShardWriter.add, shards out of order: the same files and
    manifest entries as the single-process pipeline."""
    from simsiam_kit.retrieval.pipeline import embed_one_shard, open_source
    from simsiam_kit.retrieval.shards import ShardWriter

    _run(encoder, photos, tmp_path / "ref")
    emb = OnnxEmbedder(encoder, batch_size=4)
    src = open_source(str(photos))
    w = ShardWriter(tmp_path / "d", dim=8, shard_size=4, total=len(src))
    for i in (2, 0, 1):
        w.add(embed_one_shard(emb, src, tmp_path / "d", i, shard_size=4, batch_size=4))
    w.close()
    got, ref = read_manifest(tmp_path / "d"), read_manifest(tmp_path / "ref")
    assert got["complete"] and [s.to_json() for s in got["shards"]] == [s.to_json() for s in ref["shards"]]


def test_a_resumed_run_keeps_the_runtime_its_shards_were_written_with(encoder, photos, tmp_path):
    """An embedder that picks its runtime by timing (export.runtime_choice.AutoEmbedder) chooses on the first batch
    before the fingerprint; resumed, it takes the runtime in the shards' fingerprint instead of timing again (here
    the slower one, which timing would not pick), so the resume is not refused and redoes the shard identically."""
    import time

    from simsiam_kit.export.runtime_choice import AutoEmbedder

    class Slow(OnnxEmbedder):
        def embed(self, images, normalize=None):
            time.sleep(0.05)
            return super().embed(images, normalize)

    def auto(force=None, log=None):
        runtimes = {"ort-fp32": OnnxEmbedder(encoder, batch_size=4), "slow": Slow(encoder, batch_size=4)}
        return AutoEmbedder(runtimes, {"model_sha256": "x"}, force=force, log=log, cache=tmp_path / "c.json", pause=0)

    out = tmp_path / "e"
    m = embed_to_dir(auto(force="slow"), str(photos), out, shard_size=4, workers=0)
    assert m["runtime"] == "slow" and m["provider"] == "slow: CPUExecutionProvider"
    assert read_manifest(out)["fingerprint"]["runtime"] == "slow"
    before = (out / "shards" / "00001.npy").read_bytes()
    (out / "shards" / "00001.npy").unlink()
    said = []
    m = embed_to_dir(auto(log=said.append), str(photos), out, shard_size=4, workers=0, resume=True)
    assert "runtime: slow, as the run being resumed" in said and m["runtime"] == "slow"
    assert (out / "shards" / "00001.npy").read_bytes() == before
    assert not (tmp_path / "c.json").exists()  # nothing was timed


def test_a_run_refused_by_the_directory_lock_times_no_runtime(encoder, photos, tmp_path):
    """embed takes its output directory's lock before the runtime probe: a run refused because another embed writes
    to the directory has made no encoder call and cached no choice; once the lock is free it times, chooses, writes."""
    from simsiam_kit.export.runtime_choice import AutoEmbedder
    from simsiam_kit.retrieval.shards import shard_lock

    calls = []

    class Counted(OnnxEmbedder):
        def embed(self, images, normalize=None):
            calls.append(len(images))
            return super().embed(images, normalize)

    runtimes = {"ort-fp32": Counted(encoder, batch_size=4), "ort-again": Counted(encoder, batch_size=4)}
    emb = AutoEmbedder(runtimes, {"model_sha256": "x"}, cache=tmp_path / "c.json", pause=0)
    out = tmp_path / "e"
    held = shard_lock(out).acquire()  # the other writer (flock is per open file: this process holding it counts)
    try:
        with pytest.raises(UserError, match=re.escape(f"{out}: another embedding run is writing to this directory")):
            embed_to_dir(emb, str(photos), out, shard_size=4, workers=0)
    finally:
        held.release()
    assert calls == [] and emb.runtime == "auto" and not (tmp_path / "c.json").exists()
    m = embed_to_dir(emb, str(photos), out, shard_size=4, workers=0)
    assert calls and m["runtime"] in runtimes and m["count"] == 12 and (tmp_path / "c.json").exists()


def test_workers_are_chosen_from_the_time_a_batch_takes_to_decode(encoder, photos, tmp_path, monkeypatch):
    # workers=None: decoding stays in this process when a batch decodes faster than the threshold (a hand-off
    # would cost more than it saves), else the cores but one; the log says which and the time it measured
    import simsiam_kit.retrieval.pipeline as pl

    monkeypatch.setattr(pl, "default_workers", lambda: 1)  # as on a 2-core machine, whatever this one has
    src = pl.open_source(str(photos), False)
    pre, _ = pl.stages(OnnxEmbedder(encoder, batch_size=4))
    t0 = time.perf_counter()
    imgs = pl.first_images(src, 16, 64)
    read_s = time.perf_counter() - t0
    assert len(imgs) == 12  # every photo of the folder
    monkeypatch.setattr(pl, "WORKER_MIN_BATCH_DECODE_S", 1e9)
    n, why = pl.choose_workers(imgs, read_s, pre, 4)
    assert n == 0 and "faster in this process" in why
    monkeypatch.setattr(pl, "WORKER_MIN_BATCH_DECODE_S", 0.0)
    n, why = pl.choose_workers(imgs, read_s, pre, 4)
    assert n == 1 and "overlapped with the encoder" in why
    # worked by hand: 4 images read in 1 s, preprocessing ~0 s -> 0.25 s an image -> 2,000 ms a batch of 8
    n, why = pl.choose_workers(imgs[:4], 1.0, lambda x: x, 8)
    assert n == 1 and int(re.search(r"takes (\d+) ms", why).group(1)) == 2000
    monkeypatch.setattr(pl, "WORKER_MIN_BATCH_DECODE_S", 2.1)  # the same batch under a threshold above it
    assert pl.choose_workers(imgs[:4], 1.0, lambda x: x, 8)[0] == 0
    monkeypatch.setattr(pl, "WORKER_MIN_BATCH_DECODE_S", 0.0)
    assert pl.choose_workers([], 0.0, pre, 4) == (1, "no readable image to time")
    lines: list[str] = []
    m = embed_to_dir(
        OnnxEmbedder(encoder, batch_size=4), str(photos), tmp_path / "auto", shard_size=5, log=lines.append
    )
    assert m["workers"] == 1 and any("1 decoding worker(s) (decoding a batch takes" in s for s in lines)
    monkeypatch.setattr(pl, "WORKER_MIN_BATCH_DECODE_S", 1e9)
    m = embed_to_dir(OnnxEmbedder(encoder, batch_size=4), str(photos), tmp_path / "in", shard_size=5, log=lines.append)
    assert m["workers"] == 0
    for i in range(3):  # the same files either way
        a = (tmp_path / "auto" / "shards" / f"{i:05d}.npy").read_bytes()
        assert a == (tmp_path / "in" / "shards" / f"{i:05d}.npy").read_bytes()
    assert pl.choose_workers(imgs, read_s, pre, 4)[0] == 0
    monkeypatch.setattr(pl, "default_workers", lambda: 0)
    assert pl.choose_workers(imgs, read_s, pre, 4) == (0, "one usable core")


FORK_AFTER_GARBAGE = """
import sys
from simsiam_kit.export.embedder import OnnxEmbedder
from simsiam_kit.retrieval.pipeline import embed_to_dir
enc, data, out = sys.argv[1:4]
for run in range(3):
    emb = OnnxEmbedder(enc, batch_size=4, threads=2)  # a session with a pool of 2 intra-op threads
    emb.cycle = emb  # garbage only the cycle collector frees, as a real embedder can become
    embed_to_dir(emb, data, f"{out}/{run}", index_kind="none", shard_size=8, workers=1)
    del emb
    print("run", run, "done", flush=True)
"""


def test_decoding_workers_forked_after_an_earlier_run_do_not_hang(encoder, photos, tmp_path):
    """Three embeds with a decoding worker in one process, each leaving its onnxruntime session as cyclic garbage:
    collected inside a forked worker, such a session's destructor waited for ever on threads the fork had not copied
    (the second embed hung). The pipeline collects the garbage before it forks and freezes what is left."""
    import subprocess
    import sys

    script = tmp_path / "three_runs.py"
    script.write_text(FORK_AFTER_GARBAGE)
    r = subprocess.run(
        [sys.executable, str(script), str(encoder), str(photos), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["run", "0", "done", "run", "1", "done", "run", "2", "done"]
    first = sorted((tmp_path / "out" / "0" / "shards").iterdir())
    assert len(first) == 4  # 12 photos in shards of 8: two shards, a .npy and a .parquet each
    for f in first:  # and the three runs wrote the same shards
        assert (tmp_path / "out" / "2" / "shards" / f.name).read_bytes() == f.read_bytes()
