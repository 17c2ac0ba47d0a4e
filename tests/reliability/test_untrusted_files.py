"""Untrusted files (issue 11, part B): what a small hostile file can make the program allocate or run.

Each bound is tested by making the allocating (or executing) function fail the test if it is reached:
the check must come first, not merely fail fast. The end-to-end rows (one stderr line, exit 2) are in
``tests/reliability/test_bad_inputs.py``; the hostile inputs themselves in ``tests/reliability/hostile.py``."""

from __future__ import annotations

import json
import os
import pickle
import posix
import re
from pathlib import Path

import numpy as np
import pytest

from simsiam_kit import config as config_mod
from simsiam_kit.errors import UserError

from helpers import REPO
from reliability import hostile


def _forbid(monkeypatch, target, name: str) -> None:
    def fail(*a, **k):
        raise AssertionError(f"{name} was called: the check must come before it")

    monkeypatch.setattr(target, name, fail)


# ----------------------------------------------------------------------------------------- YAML configs
def test_alias_bomb_is_refused_before_anything_is_copied(tmp_path, monkeypatch):
    bomb = hostile.yaml_alias_bomb(tmp_path / "bomb.yaml")
    assert len(bomb.read_bytes()) < 600
    _forbid(monkeypatch, config_mod, "_deepcopy")  # what expanded the aliases (--set merges a copy)
    _forbid(monkeypatch, config_mod, "_from_dict")
    with pytest.raises(UserError, match=r"bomb\.yaml: YAML anchor '&a0' at line 1: anchors and aliases"):
        config_mod.load_pretrain_config(str(bomb), ["optim.epochs=1"])


@pytest.mark.parametrize(
    "text, what", [("a: &x 1\nb: 2\n", "anchor '&x'"), ("base: {k: 1}\nother:\n  <<: *base\n", "alias '*base'")]
)
def test_any_anchor_or_alias_is_refused(tmp_path, text, what):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=f"c.yaml: YAML {what.replace('*', '[*]')}"):
        config_mod.load_yaml(p)


def test_binary_deep_and_bigint_yaml_are_one_line_errors(tmp_path):
    cases = [
        (hostile.yaml_binary(tmp_path / "bin.yaml"), "not a UTF-8 text file (byte 0x89 at offset 0)"),
        (hostile.yaml_deep(tmp_path / "deep.yaml"), "nested too deeply"),
        (hostile.yaml_bigint(tmp_path / "big.yaml"), "invalid YAML value"),
    ]
    for path, msg in cases:
        with pytest.raises(UserError) as e:
            config_mod.load_yaml(path)
        assert str(path) in str(e.value) and msg in str(e.value) and "\n" not in str(e.value)


def test_oversized_config_is_refused_before_parsing(tmp_path, monkeypatch):
    p = hostile.yaml_huge(tmp_path / "huge.yaml")
    _forbid(monkeypatch, config_mod._ConfigLoader, "get_single_data")
    with pytest.raises(UserError, match=f"larger than {config_mod.MAX_CONFIG_BYTES} bytes"):
        config_mod.load_yaml(p)


def test_every_shipped_config_passes_the_strict_loader():
    names = sorted(Path(config_mod.REPO_ROOT / "configs").rglob("*.yaml"))
    assert len(names) >= 5
    for p in names:
        assert isinstance(config_mod.load_yaml(p), dict), p


def test_detection_configs_load_through_the_strict_loader(tmp_path):
    from simsiam_kit.evaluation.detection.torchvision_engine import load_detection_config

    with pytest.raises(UserError, match="bomb.yaml: YAML anchor"):
        load_detection_config(str(hostile.yaml_alias_bomb(tmp_path / "bomb.yaml")))


# ----------------------------------------------------------------------------------------- FAISS index
@pytest.fixture
def faiss():
    return pytest.importorskip("faiss")  # the cpu extra; the torch-backend tests below do not need it


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _saved(tmp_path, kind, n=100, d=16):
    from simsiam_kit.retrieval.index import EmbeddingIndex

    x = _unit(n, d)
    out = tmp_path / f"ix_{kind}"
    EmbeddingIndex(d, kind, "faiss", use_gpu=False).add(x).save(out)
    return out, x


def _check(d: Path):
    from simsiam_kit.retrieval.files import check_faiss_file

    m = json.loads((d / "index.json").read_text())
    check_faiss_file(d / "index.faiss", m["kind"], m["dim"], m["ntotal"], m["nlist"])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_files_faiss_writes_pass_the_parser(tmp_path, kind, faiss):
    d, _ = _saved(tmp_path, kind)
    _check(d)


def test_sparse_ivf_lists_pass_the_parser(tmp_path, faiss):
    """Few vectors in many lists: faiss writes the list sizes in its sparse form."""
    x = _unit(2000, 8)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 40, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add(x[:5])
    ivf.nprobe = 4
    d = tmp_path / "sparse"
    d.mkdir()
    faiss.write_index(ivf, str(d / "index.faiss"))
    assert b"sprs" in (d / "index.faiss").read_bytes()
    (d / "index.json").write_text(
        json.dumps({"dim": 8, "kind": "ivf", "backend": "faiss", "nlist": 40, "nprobe": 4, "hnsw_m": 32, "ntotal": 5})
    )
    _check(d)


def test_corrupt_vector_count_fails_before_faiss_allocates(tmp_path, monkeypatch, faiss):
    """The 43 KB index with 4 bytes changed that drove `search` to 15.7 GB: faiss would allocate the
    declared count (here 4 x 2**32 floats, 16 GiB) before reading; faiss.read_index is never reached."""
    from simsiam_kit.retrieval.index import EmbeddingIndex

    d, _ = _saved(tmp_path, "flat", n=170, d=64)
    assert 40_000 < (d / "index.faiss").stat().st_size < 45_000
    hostile.patch_bytes(d / "index.faiss", hostile.FLAT_COUNT_OFFSET + 4, b"\x01\x00\x00\x00")
    _forbid(monkeypatch, faiss, "read_index")
    with pytest.raises(
        UserError,
        match=r"index\.faiss: corrupt or foreign FAISS index \(flat index vectors "
        r"declares 4294978176 elements",
    ):
        EmbeddingIndex.load(d, use_gpu=False)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_every_4_byte_overwrite_is_refused_or_harmless(tmp_path, kind, faiss):
    """Overwrite 4 bytes at each offset of the structure (the first 400 bytes and the last 64) with
    0x7fffffff, 0 or 1: the parser refuses the file, or faiss reads it and searches it with every id
    in range (the bytes changed were vector data)."""
    d, x = _saved(tmp_path, kind, n=60, d=8)
    m = json.loads((d / "index.json").read_text())
    orig = (d / "index.faiss").read_bytes()
    bad_path = tmp_path / "bad.faiss"
    from simsiam_kit.retrieval.files import check_faiss_file

    refused = 0
    offsets = [*range(0, min(400, len(orig) - 4)), *range(len(orig) - 64, len(orig) - 4)]
    for off in offsets:
        for val in (b"\xff\xff\xff\x7f", b"\x00\x00\x00\x00", b"\x01\x00\x00\x00"):
            data = orig[:off] + val + orig[off + 4 :]
            if data == orig:
                continue
            bad_path.write_bytes(data)
            try:
                check_faiss_file(bad_path, kind, m["dim"], m["ntotal"], m["nlist"])
            except UserError:
                refused += 1
                continue
            idx = faiss.read_index(str(bad_path))
            _, ids = idx.search(x[:4], 5)
            assert ids.max() < m["ntotal"], (kind, off, val)
    assert refused >= 40


def test_index_json_is_checked_key_by_key(tmp_path, faiss):
    from simsiam_kit.retrieval.index import EmbeddingIndex

    d, _ = _saved(tmp_path, "flat")
    j = d / "index.json"
    good = j.read_text()
    for change, msg in [
        (dict(ntotal=...), "missing key 'ntotal'"),
        (dict(dim="16"), "key 'dim' must be an integer"),
        (dict(dim=0), "key 'dim' must be in"),
        (dict(kind="kdtree"), "unknown index kind 'kdtree'"),
        (dict(ntotal=99), "holds 100 vectors, index.json says 99"),
        (dict(dim=32), "has dimension 16, index.json says 32"),
        (dict(kind="hnsw"), "is not the hnsw index"),
    ]:
        j.write_text(good)
        hostile.set_json(j, **change)
        with pytest.raises(UserError, match=msg.replace("(", r"\(")):
            EmbeddingIndex.load(d, use_gpu=False)
    j.write_bytes(b"\xff\xfe binary")
    with pytest.raises(UserError, match="index.json: not UTF-8"):
        EmbeddingIndex.load(d, use_gpu=False)
    j.write_text("[" * 100_000)
    with pytest.raises(UserError, match="index.json: (JSON nested too deeply|invalid JSON)"):
        EmbeddingIndex.load(d, use_gpu=False)


# ----------------------------------------------------------------------------------------- .npy files
def test_npy_declaring_a_huge_shape_is_refused_before_reading(tmp_path, monkeypatch):
    from simsiam_kit.retrieval.files import load_npy

    p = hostile.npy_declaring(tmp_path / "v.npy", (10**12, 16))
    _forbid(monkeypatch, np, "load")
    _forbid(monkeypatch, np, "fromfile")
    with pytest.raises(
        UserError,
        match=r"v\.npy: header declares shape \(1000000000000, 16\) of float32 "
        r"\(64000000000000 bytes\) but the file holds 0 bytes",
    ):
        load_npy(p, "f", 2)


def test_pickled_npy_is_refused_without_unpickling(tmp_path, monkeypatch):
    from simsiam_kit.retrieval.files import load_npy

    p = tmp_path / "labels.npy"
    np.save(p, np.array([1, hostile.Foreign()], dtype=object), allow_pickle=True)
    _forbid(monkeypatch, np, "load")
    _forbid(monkeypatch, pickle, "load")
    with pytest.raises(UserError, match="labels.npy: holds Python objects .* only a pickle can load; refused"):
        load_npy(p, "iu", 1)


def test_npy_dtype_and_shape_are_checked(tmp_path):
    from simsiam_kit.retrieval.files import load_npy

    np.save(tmp_path / "f.npy", np.zeros((3, 2), np.float32))
    assert load_npy(tmp_path / "f.npy", "f", 2, (3, 2)).shape == (3, 2)
    with pytest.raises(UserError, match=r"f\.npy: shape \(3, 2\), expected \(4, 2\)"):
        load_npy(tmp_path / "f.npy", "f", 2, (4, 2))
    with pytest.raises(UserError, match="f.npy: expected integer values, got dtype float32"):
        load_npy(tmp_path / "f.npy", "iu", 2)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"\x00" * 20)
    with pytest.raises(UserError, match="junk.npy: not a valid .npy file"):
        load_npy(tmp_path / "junk.npy", "f", 2)


def test_torch_backend_vectors_checked_against_index_json(tmp_path, monkeypatch):
    from simsiam_kit.retrieval.index import EmbeddingIndex

    d = tmp_path / "ix"
    EmbeddingIndex(8, "flat", "torch", device="cpu").add(_unit(10, 8)).save(d)
    assert EmbeddingIndex.load(d).ntotal == 10
    hostile.npy_declaring(d / "index_vectors.npy", (2**40, 8))
    _forbid(monkeypatch, np, "load")
    with pytest.raises(UserError, match="index_vectors.npy: header declares shape"):
        EmbeddingIndex.load(d)
    (d / "index_vectors.npy").unlink()
    with pytest.raises(UserError, match="index_vectors.npy: missing"):
        EmbeddingIndex.load(d)


# ----------------------------------------------------------------------------------------- ONNX models
def test_onnx_image_size_is_bounded_before_any_allocation(tmp_path, monkeypatch):
    from simsiam_kit.export import embedder as emb_mod

    p = hostile.onnx_encoder(tmp_path / "m.onnx", meta={"image_size": "60000"})
    _forbid(monkeypatch, emb_mod, "make_session")
    _forbid(monkeypatch, emb_mod, "preprocess")
    with pytest.raises(UserError, match=r"m\.onnx: metadata image_size=60000 is outside 1\.\.4096 pixels"):
        emb_mod.OnnxEmbedder(p)
    p = hostile.onnx_encoder(tmp_path / "d.onnx", meta={"embedding_dim": str(2**40)})
    with pytest.raises(UserError, match="embedding_dim=1099511627776 is outside"):
        emb_mod.OnnxEmbedder(p)


def test_onnx_graph_must_agree_with_its_metadata(tmp_path):
    from simsiam_kit.export.embedder import OnnxEmbedder

    p = hostile.onnx_encoder(tmp_path / "one_d.onnx", one_d=True)
    with pytest.raises(UserError, match=r"one_d\.onnx: graph output 'embeddings' has shape \['batch'\]"):
        OnnxEmbedder(p)
    p = hostile.onnx_encoder(tmp_path / "size.onnx", size=4000, input_size=4)
    with pytest.raises(UserError, match=r"size\.onnx: graph input 'images' has shape \['batch', 3, 4, 4\]"):
        OnnxEmbedder(p)
    p = hostile.onnx_encoder(tmp_path / "dim.onnx", meta={"embedding_dim": "5"})
    with pytest.raises(UserError, match=r"dim\.onnx: graph output 'embeddings' has shape \['batch', 3\]"):
        OnnxEmbedder(p)


def test_onnx_output_shape_is_checked_at_every_run(tmp_path):
    """A graph may leave its output's axes dynamic: what a run returns is checked too."""
    from simsiam_kit.export.embedder import OnnxEmbedder

    emb = OnnxEmbedder(hostile.onnx_encoder(tmp_path / "m.onnx"))

    class OneD:  # the session of a graph that declared (batch, dynamic) and returns (N,)
        def __init__(self, real):
            self.real = real

        def run(self, names, feeds):
            return [o[:, 0] for o in self.real.run(names, feeds)]

    emb.session = OneD(emb.session)
    with pytest.raises(
        UserError,
        match=r"m\.onnx: output 'embeddings' has shape \(2,\) for 2 images; an encoder "
        r"gives \(2, 3\)",
    ):
        emb.embed(np.zeros((2, 4, 4, 3), np.uint8))


def test_large_images_are_embedded_in_smaller_chunks(tmp_path, monkeypatch):
    from simsiam_kit.export import embedder as emb_mod

    emb = emb_mod.OnnxEmbedder(hostile.onnx_encoder(tmp_path / "m.onnx"), batch_size=64)
    assert emb.chunk == 64
    monkeypatch.setattr(emb_mod, "MAX_BATCH_BYTES", 3 * 4 * 4 * 4 * 5)  # five 4x4 images
    assert emb.chunk == 5
    calls = []
    run = emb.run
    monkeypatch.setattr(emb, "run", lambda x: calls.append(len(x)) or run(x))
    assert emb.embed(np.zeros((12, 4, 4, 3), np.uint8)).shape == (12, 3)
    assert calls == [5, 5, 2]


# ----------------------------------------------------------------------------------------- detectron2 .pkl
@pytest.fixture
def benign_pkl(tmp_path):
    """A .pkl written by the converter (`simsiam-kit export detectron2`)."""
    import torch

    from simsiam_kit.detectron2_weights import checkpoint_payload, convert_state_dict, write_detectron2_pkl
    from simsiam_kit.models.backbones import build_backbone

    torch.manual_seed(0)
    conv = convert_state_dict(build_backbone("resnet18", "imagenet").state_dict())
    return write_detectron2_pkl(checkpoint_payload(conv), tmp_path / "ok.pkl"), conv


def test_converter_output_passes_the_restricted_unpickler(benign_pkl):
    from simsiam_kit.detectron2_weights import load_detectron2_pkl

    path, conv = benign_pkl
    got = load_detectron2_pkl(path)
    assert got["__author__"] == "simsiam-kit" and got["matching_heuristics"] is True
    assert got["model"].keys() == conv.model.keys()
    for k, v in conv.model.items():
        np.testing.assert_array_equal(got["model"][k], v)
        assert got["model"][k].dtype == v.dtype


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_pickles_of_every_protocol_pass(tmp_path, protocol):
    from collections import OrderedDict

    from simsiam_kit.detectron2_weights import load_detectron2_pkl

    obj = {
        "model": OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.arange(3, dtype=np.int64)),
        "meta": [1, 2.5, "x", None, True, (1, 2), {3}, frozenset({4})],
        "dt": np.dtype("<f2"),
    }
    (tmp_path / "p.pkl").write_bytes(pickle.dumps(obj, protocol=protocol))
    got = load_detectron2_pkl(tmp_path / "p.pkl")
    assert got["meta"] == obj["meta"] and got["dt"] == obj["dt"]
    for k in obj["model"]:
        np.testing.assert_array_equal(got["model"][k], obj["model"][k])


def test_python2_numpy_pickle_passes(tmp_path):
    from simsiam_kit.detectron2_weights import load_detectron2_pkl

    path, a = hostile.pickle_py2_numpy(tmp_path / "py2.pkl")
    got = load_detectron2_pkl(path)
    np.testing.assert_array_equal(got["blobs"]["w"], a)


@pytest.fixture
def no_exec(monkeypatch):
    """os.system and eval fail the test if anything calls them while a pickle is read."""
    import builtins

    import simsiam_kit.detectron2_weights  # noqa: F401  (imported before eval is replaced)
    import simsiam_kit.evaluation.detection.detectron2_engine  # noqa: F401

    for target, name in ((os, "system"), (posix, "system"), (builtins, "eval")):
        _forbid(monkeypatch, target, name)


@pytest.mark.parametrize(
    "make, refused",
    [
        (lambda p, m: hostile.pickle_os_system(p, m), "global 'posix.system'"),
        (lambda p, m: hostile.pickle_eval(p, m), "global 'builtins.eval'"),
        (lambda p, m: hostile.pickle_foreign_class(p), "global 'reliability.hostile.Foreign'"),
        (lambda p, m: hostile.pickle_object_array(p), "numpy dtype object"),
        (lambda p, m: hostile.pickle_persistent_id(p), "a persistent id"),
        (lambda p, m: hostile.pickle_reconstruct_huge(p), "numpy _reconstruct with a non-empty shape (1073741824,)"),
    ],
)
def test_malicious_pickles_are_refused_and_never_run(tmp_path, no_exec, make, refused):
    from simsiam_kit.detectron2_weights import load_detectron2_pkl

    marker = tmp_path / "pwned"
    path = make(tmp_path / "evil.pkl", marker)
    with pytest.raises(UserError) as e:
        load_detectron2_pkl(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: refused to unpickle {refused}") and "\n" not in msg, msg
    assert not marker.exists()


def test_declared_lengths_are_checked_before_unpickling(tmp_path, monkeypatch):
    from simsiam_kit import detectron2_weights as d2w

    path = hostile.pickle_bytes8_bomb(tmp_path / "bomb.pkl")
    _forbid(monkeypatch, d2w, "_RestrictedUnpickler")  # the C unpickler allocates BINBYTES8 before reading
    with pytest.raises(
        UserError,
        match=r"bomb\.pkl: not a readable pickle \(ValueError: expected 1099511627776 "
        r"bytes in a bytes8, but only 3 remain\)",
    ):
        d2w.load_detectron2_pkl(path)


def test_other_pickle_shapes_are_refused(tmp_path):
    from simsiam_kit.detectron2_weights import MAX_PICKLE_DEPTH, load_detectron2_pkl

    deep: list = []
    for _ in range(MAX_PICKLE_DEPTH + 5):
        deep = [deep]
    for name, obj, msg in [
        ("deep", {"x": deep}, "nested deeper than"),
        ("list", [1, 2], "holds a list, not the dict"),
        ("bytes", {"model": b"raw"}, "a value of type builtins.bytes"),
        ("complex", {"x": 1j}, "global '__builtin__.complex'"),
    ]:
        (tmp_path / f"{name}.pkl").write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(UserError, match=msg):
            load_detectron2_pkl(tmp_path / f"{name}.pkl")
    (tmp_path / "codecs.pkl").write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(UserError, match="_codecs.encode with encoding 'zlib'"):
        load_detectron2_pkl(tmp_path / "codecs.pkl")
    (tmp_path / "text.pkl").write_text("not a pickle")
    with pytest.raises(UserError, match="text.pkl: not a readable pickle"):
        load_detectron2_pkl(tmp_path / "text.pkl")


def test_detectron2_engine_refuses_a_hostile_pkl_before_detectron2(tmp_path, no_exec, monkeypatch):
    """The engine's call path, without detectron2: the .pkl is refused before detectron2 is imported."""
    from simsiam_kit.evaluation.detection import detectron2_engine as eng

    _forbid(monkeypatch, eng, "require_detectron2")
    marker = tmp_path / "pwned"
    evil = hostile.pickle_os_system(tmp_path / "evil.pkl", marker)
    with pytest.raises(UserError, match="evil.pkl: refused to unpickle global 'posix.system'"):
        eng.run_detectron2_detection("d2_coco_R_18_FPN_quick", str(evil), None, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_detectron2_engine_hands_detectron2_a_checked_copy(tmp_path, benign_pkl):
    from simsiam_kit.evaluation.detection import detectron2_engine as eng

    path, conv = benign_pkl
    checked = eng.load_weights_pkl(str(path))
    assert eng.load_weights_pkl("runs/some-run") is None
    lines = []
    got = eng.weights_for_detectron2(str(path), checked, tmp_path / "out", lines.append)
    assert Path(got) == (tmp_path / "out" / eng.CHECKED_PKL).resolve() and Path(got) != path.resolve()
    assert "restricted unpickler" in lines[0]
    with open(got, "rb") as f:
        copy = pickle.load(f)  # what detectron2 does with MODEL.WEIGHTS
    assert copy["model"].keys() == conv.model.keys()
    np.testing.assert_array_equal(copy["model"]["res5.1.conv2.weight"], conv.model["res5.1.conv2.weight"])
    assert eng.weights_for_detectron2("random", None, tmp_path / "out", lines.append) == ""
    with pytest.raises(UserError, match="weights not found"):
        eng.load_weights_pkl(str(tmp_path / "missing.pkl"))


def test_help_and_docs_say_a_pkl_is_unpickled():
    from typer.testing import CliRunner

    from simsiam_kit.cli import app

    r = CliRunner().invoke(app, ["eval", "detection", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "detectron2 loads .pkl weights with pickle, which can run code" in text
    assert "restricted unpickler" in text
    doc = " ".join((REPO / "docs" / "detection.md").read_text().split())
    assert "detectron2 loads it with `pickle.load`, which can run any code" in doc


# ----------------------------------------------------------------------------------------- issue 24, part A
# run directories received from someone else: the lock file
def _victim(tmp_path) -> Path:
    v = tmp_path / "victim.txt"
    v.write_text("precious\n")
    return v


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "hard link", "fifo", "directory"])
def test_lock_file_that_is_not_a_plain_file_is_refused_and_nothing_is_written(tmp_path, kind):
    from simsiam_kit.engine.run_dir import RunDir

    run = tmp_path / "run"
    run.mkdir()
    victim = _victim(tmp_path)
    lock = run / ".lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dangling symlink":
        lock.symlink_to(tmp_path / "created-by-the-lock")
    elif kind == "hard link":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    with pytest.raises(UserError, match=r"\.lock: .*a run's lock file must be a regular file") as e:
        RunDir(run).lock()
    assert "\n" not in str(e.value)
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "created-by-the-lock").exists()


def test_a_plain_lock_file_still_locks_and_records_the_pid(tmp_path):
    from simsiam_kit.engine.run_dir import RunDir

    run = RunDir(tmp_path / "run").lock()
    try:
        assert run.lock_file.read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError, match="another simsiam-kit run is using this directory"):
            RunDir(tmp_path / "run").lock()
    finally:
        run.unlock()


# YAML: --set values and config.amendments.yaml go through the one bounded loader
def _alias_value(levels: int = 4) -> str:
    """A flow-style alias bomb for one --set value: each level x9."""
    parts = ["[&a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for i in range(1, levels):
        parts.append(f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return ", ".join(parts) + "]"


@pytest.mark.parametrize("key", ["name", "optim.epochs", "data.mean"])
def test_alias_bomb_in_a_set_value_is_refused(key):
    value = _alias_value()
    assert len(value) < 300
    with pytest.raises(UserError, match=f"--set {key}: YAML anchor '&a0'") as e:
        config_mod.load_pretrain_config("demo", [f"{key}={value}"])
    assert len(str(e.value)) < 300  # nothing expanded into the message


def test_set_values_still_parse_as_yaml_scalars_and_lists():
    cfg = config_mod.load_pretrain_config(
        "demo", ["optim.epochs=3", "model.predictor=false", "data.mean=[0.5, 0.5, 0.5]", "name=a b", "data.val=null"]
    )
    assert (cfg.optim.epochs, cfg.model.predictor, cfg.data.mean, cfg.name, cfg.data.val) == (
        3,
        False,
        (0.5, 0.5, 0.5),
        "a b",
        None,
    )
    assert config_mod.load_pretrain_config("demo", ["name=[x"]).name == "[x"  # not YAML: the literal text


def test_amendments_file_loads_through_the_bounded_loader(tmp_path):
    ok = tmp_path / "config.amendments.yaml"
    ok.write_text("- after_epoch: 2\n  set:\n    optim.epochs: 5\n")
    assert config_mod.load_yaml(ok, expect=list) == [{"after_epoch": 2, "set": {"optim.epochs": 5}}]
    (tmp_path / "empty.yaml").write_text("")
    assert config_mod.load_yaml(tmp_path / "empty.yaml", expect=list) == []
    bomb = tmp_path / "bomb.amendments.yaml"
    bomb.write_text(f"- after_epoch: 1\n  set:\n    log.wandb_project: {_alias_value(9)}\n")
    with pytest.raises(UserError, match=r"bomb\.amendments\.yaml: YAML anchor '&a0'"):
        config_mod.load_yaml(bomb, expect=list)
    (tmp_path / "mapping.yaml").write_text("a: 1\n")
    with pytest.raises(UserError, match=r"mapping\.yaml: top level must be a list"):
        config_mod.load_yaml(tmp_path / "mapping.yaml", expect=list)


def test_config_that_is_a_link_to_a_device_is_refused(tmp_path):
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    with pytest.raises(UserError, match=r"zero\.yaml \(a config\): a character device, not a regular file"):
        config_mod.load_yaml(link)


# the run name and the image size: one rule each
@pytest.mark.parametrize("raw", ["../../x", "a/b", "..", ".", "''", "a\\b", "' lead'", "x" * 129, '"tab\\there"'])
def test_run_name_must_be_a_plain_directory_name(raw):
    with pytest.raises(UserError, match="bad value for 'name'"):
        config_mod.load_pretrain_config("demo", [f"name={raw}"])


def test_image_size_has_one_upper_bound_for_config_and_evaluation():
    from simsiam_kit.image_settings import MAX_IMAGE_SIZE, resolve_image_settings

    assert config_mod.load_pretrain_config("demo", [f"data.image_size={MAX_IMAGE_SIZE}"]).data.image_size == 4096
    with pytest.raises(UserError, match=r"'data.image_size': 100000 \(expected 8\.\.4096 pixels\)"):
        config_mod.load_pretrain_config("demo", ["data.image_size=100000"])
    with pytest.raises(UserError, match="expected 8..4096 pixels"):
        resolve_image_settings(option={"image_size": 100000})


# special files behind user-supplied paths: refused before a byte is read
def test_open_regular_refuses_devices_fifos_and_directories(tmp_path):
    from simsiam_kit.utils.io import open_regular, read_bytes_bounded

    (tmp_path / "zero").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo")  # no writer: a blocking open would wait for ever
    (tmp_path / "dir").mkdir()
    for name, kind in (("zero", "a character device"), ("fifo", "a FIFO"), ("dir", "a directory")):
        with pytest.raises(UserError, match=f"{name}: {kind}, not a regular file; refused"):
            open_regular(tmp_path / name)
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 10)
    assert read_bytes_bounded(f, 10) == b"x" * 10
    with pytest.raises(UserError, match=r"f\.bin: larger than 9 bytes"):
        read_bytes_bounded(f, 9)


def test_embedding_files_linked_to_dev_zero_are_refused(tmp_path):
    from simsiam_kit.retrieval.files import check_faiss_file, load_npy, read_json

    for name in ("ids.json", "labels.npy", "index.faiss"):
        (tmp_path / name).symlink_to("/dev/zero")
    with pytest.raises(UserError, match=r"ids\.json.*not a regular file"):
        read_json(tmp_path / "ids.json", list, "the ids")
    with pytest.raises(UserError, match=r"labels\.npy.*not a regular file"):
        load_npy(tmp_path / "labels.npy", "iu", 1)
    with pytest.raises(UserError, match=r"index\.faiss.*not a regular file"):
        check_faiss_file(tmp_path / "index.faiss", "flat", 8, 1, 0)


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_weights_that_are_not_a_regular_file_are_refused(tmp_path, target):
    from simsiam_kit.weights import load_backbone

    if target == "fifo":
        os.mkfifo(tmp_path / "w.pt")
        spec = tmp_path / "w.pt"
    else:
        spec = Path(target)
    with pytest.raises(UserError, match="not a regular file; refused"):
        load_backbone(str(spec))
    link = tmp_path / "link.pt"
    link.symlink_to("/dev/zero")
    with pytest.raises(UserError, match=r"link\.pt \(weights\): a character device"):
        load_backbone(str(link))


# strict JSON
def test_json_writer_refuses_nan_and_infinity_naming_the_key(tmp_path):
    from simsiam_kit.utils.io import atomic_write_json

    p = tmp_path / "results.json"
    for bad, key in (
        ({"knn": {"top1": float("nan")}}, "knn.top1"),
        ({"rows": [{"t": 1.0}, {"t": float("inf")}]}, "rows[1].t"),
        ([float("-inf")], "[0]"),
    ):
        with pytest.raises(UserError, match=rf"cannot write .*results\.json: '{re.escape(key)}' is"):
            atomic_write_json(p, bad)
        assert not p.exists()
    atomic_write_json(p, {"top1": 0.5, "n": 3, "s": "x", "none": None})
    assert json.loads(p.read_text()) == {"top1": 0.5, "n": 3, "s": "x", "none": None}


# malformed weight files: one line naming the file and what is wrong
@pytest.fixture(scope="module")
def resnet_sd():
    from simsiam_kit.weights import random_backbone

    return random_backbone("resnet18", "cifar").state_dict()


def test_integer_weights_are_refused(tmp_path, resnet_sd):
    from simsiam_kit.weights import load_backbone

    p = tmp_path / "int64.pt"
    torch = pytest.importorskip("torch")
    torch.save({k: v.to(torch.int64) for k, v in resnet_sd.items()}, p)
    with pytest.raises(UserError, match=r"int64\.pt: 'conv1\.weight' holds int64 values; weights must be floating"):
        load_backbone(str(p))
    torch.save(resnet_sd, tmp_path / "ok.pt")  # the same file in float32 loads
    assert load_backbone(str(tmp_path / "ok.pt")).arch == "resnet18"


def _bad_weights(resnet_sd):
    from simsiam_kit.engine.checkpoint import BACKBONE_FORMAT, CHECKPOINT_FORMAT

    renamed = {("layer1.x.conv1.weight" if k == "layer1.0.conv1.weight" else k): v for k, v in resnet_sd.items()}
    return {
        "backbone without state_dict": ({"format": BACKBONE_FORMAT, "arch": "resnet18"}, "holds no 'state_dict'"),
        "backbone state_dict a list": (
            {"format": BACKBONE_FORMAT, "state_dict": [1, 2]},
            "'state_dict' is not a state",
        ),
        "backbone state_dict of ints": ({"format": BACKBONE_FORMAT, "state_dict": {"a": 1}}, "'state_dict' is not a"),
        "backbone arch an int": (
            {"format": BACKBONE_FORMAT, "state_dict": dict(resnet_sd), "arch": 5},
            "'arch' is 5, expected a str",
        ),
        "checkpoint without model": ({"format": CHECKPOINT_FORMAT, "epoch": 1}, "holds no 'model'"),
        "checkpoint model a string": ({"format": CHECKPOINT_FORMAT, "model": "x"}, "'model' is not a state dict"),
        "checkpoint epoch a string": (
            {"format": CHECKPOINT_FORMAT, "model": {f"backbone.{k}": v for k, v in resnet_sd.items()}, "epoch": "x"},
            "'epoch' is 'x', expected an integer",
        ),
        "checkpoint config a list": (
            {"format": CHECKPOINT_FORMAT, "model": {f"backbone.{k}": v for k, v in resnet_sd.items()}, "config": [1]},
            "'config' of this checkpoint is not a config mapping",
        ),
        "stage key without a block index": (renamed, "key 'layer1.x.conv1.weight' is not a ResNet stage key"),
        "conv1 not 4-D": ({**resnet_sd, "conv1.weight": resnet_sd["conv1.weight"].flatten()}, "not a convolution"),
    }


BAD_WEIGHTS = [
    "backbone without state_dict",
    "backbone state_dict a list",
    "backbone state_dict of ints",
    "backbone arch an int",
    "checkpoint without model",
    "checkpoint model a string",
    "checkpoint epoch a string",
    "checkpoint config a list",
    "stage key without a block index",
    "conv1 not 4-D",
]


@pytest.mark.parametrize("case", BAD_WEIGHTS)
def test_malformed_weight_files_are_one_line_errors(tmp_path, resnet_sd, case):
    torch = pytest.importorskip("torch")
    from simsiam_kit.weights import load_backbone

    table = _bad_weights(resnet_sd)
    assert set(table) == set(BAD_WEIGHTS)
    obj, needle = table[case]
    p = tmp_path / "bad.pt"
    torch.save(obj, p)
    with pytest.raises(UserError) as e:
        load_backbone(str(p))
    assert str(e.value).startswith(str(p)) and needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# malformed COCO / VOC annotations: one line naming the file and the entry, never a traceback
def _coco(**change) -> dict:
    d = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    for path, value in change.items():
        key, _, field = path.partition("__")
        if field:
            d[key][0][field] = value
        else:
            d[key] = value
    return d


def _ann(**kw) -> list:
    return [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12], "iscrowd": 0, **kw}]


BAD_COCO = {
    "category without id": (_coco(categories=[{"name": "cat"}]), "categories[0] has 'id' None"),
    "mixed-type category ids": (
        _coco(categories=[{"id": 1, "name": "cat"}, {"id": "2", "name": "dog"}]),
        "categories[1] has 'id' '2'",
    ),
    "string categories": (_coco(categories=["cat", "dog"]), "categories[0] is 'cat'"),
    "category name not a string": (_coco(categories=[{"id": 1, "name": 5}]), "'name' 5"),
    "image not an object": (_coco(images=[3]), "images[0] is 3"),
    "annotation not an object": (_coco(annotations=["box"]), "annotations[0] is 'box'"),
    "file_name not a string": (_coco(images__file_name=5), "'file_name' 5"),
    "image id a list": (_coco(images__id=[1]), "images[0] has 'id' [1]"),
    "image width negative": (_coco(images__width=-4), "'width' -4"),
    "bbox not numbers": (_coco(annotations=_ann(bbox=["a", 1, 2, 3])), "annotation 7 has 'bbox' ['a', 1, 2, 3]"),
    "bbox of 3": (_coco(annotations=_ann(bbox=[1, 2, 3])), "annotation 7 has 'bbox' [1, 2, 3]"),
    "iscrowd not numeric": (_coco(annotations=_ann(iscrowd="no")), "annotation 7 has 'iscrowd' 'no'"),
    "image_id a list": (_coco(annotations=_ann(image_id=[1])), "'image_id' [1]"),
    "NaN box": (_coco(annotations=_ann(bbox=[float("nan"), 3, 10, 12])), "non-finite coordinate"),
    "infinite box": (_coco(annotations=_ann(bbox=[2, 3, float("inf"), 12])), "non-finite coordinate"),
    "negative width": (_coco(annotations=_ann(bbox=[20, 3, -10, 12])), "min > max"),
    "box outside the image": (_coco(annotations=_ann(bbox=[35, 3, 10, 12])), "outside the 40x30 image"),
}


@pytest.mark.parametrize("case", list(BAD_COCO))
def test_malformed_coco_annotations_are_one_line_errors(tmp_path, case):
    from PIL import Image

    from simsiam_kit.evaluation.detection.data import load_coco_json

    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    coco, needle = BAD_COCO[case]
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(coco))  # NaN/Infinity tokens: what Python's json writes and reads by default
    with pytest.raises(UserError) as e:
        load_coco_json(p, tmp_path)
    msg = str(e.value)
    assert msg.startswith(str(p)) and needle in msg and "\n" not in msg, msg


def test_valid_coco_next_to_the_bad_ones_loads(tmp_path):
    from PIL import Image

    from simsiam_kit.evaluation.detection.data import load_coco_json

    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    (tmp_path / "ann.json").write_text(json.dumps(_coco()))
    ds = load_coco_json(tmp_path / "ann.json", tmp_path)
    np.testing.assert_allclose(ds.records[0]["boxes"], [[2, 3, 12, 15]])
    assert ds.records[0]["labels"].tolist() == [1] and ds.num_classes == 2


_VOC_OK = (
    "<object><name>dog</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>"
)
BAD_VOC = {
    "no size": ("<annotation>" + _VOC_OK + "</annotation>", "has no <size><width>"),
    "size not a number": (
        "<annotation><size><width>wide</width><height>48</height></size>" + _VOC_OK + "</annotation>",
        "<size><width> is 'wide'",
    ),
    "object without a name": ("<object><bndbox><xmin>1</xmin></bndbox></object>", "object 0 has no <name>"),
    "object without a bndbox": ("<object><name>dog</name></object>", "object 0 (dog) has no <bndbox>"),
    "coordinate not a number": (_VOC_OK.replace("<xmax>30", "<xmax>3O"), "<bndbox><xmax> is '3O'"),
    "coordinate missing": (_VOC_OK.replace("<ymax>40</ymax>", ""), "object 0 has no <bndbox><ymax>"),
    "coordinate NaN": (_VOC_OK.replace("<xmin>11", "<xmin>nan"), "<bndbox><xmin> is 'nan'"),
    "xmin > xmax": (_VOC_OK.replace("<xmin>11", "<xmin>40"), "min > max"),
    "box outside the image": (_VOC_OK.replace("<xmax>30", "<xmax>300"), "outside the 64x48 image"),
    "difficult not 0/1": (_VOC_OK.replace("<name>dog</name>", "<name>dog</name><difficult>x</difficult>"), "'x'"),
}


@pytest.mark.parametrize("case", list(BAD_VOC))
def test_malformed_voc_annotations_are_one_line_errors(tmp_path, case):
    from PIL import Image

    from simsiam_kit.evaluation.detection.data import load_voc

    root = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(root / "JPEGImages" / "000001.jpg")
    xml, needle = BAD_VOC[case]
    if not xml.startswith("<annotation>"):
        xml = "<annotation><size><width>64</width><height>48</height></size>" + xml + "</annotation>"
    (root / "Annotations" / "000001.xml").write_text(xml)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n")
    with pytest.raises(UserError) as e:
        load_voc(tmp_path / "VOCdevkit", "2007/trainval")
    msg = str(e.value)
    assert msg.startswith(str(root / "Annotations" / "000001.xml")) and needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "item, needle",
    [
        ("train.knn_temperature=0.01", "'train.knn_temperature': 0.01 (expected >= 0.02"),
        ("train.dist_timeout_s=1e300", "'train.dist_timeout_s': 1e+300 (expected > 0 and <= 2592000 seconds"),
    ],
)
def test_config_floats_are_finite_and_in_a_usable_range(item, needle):
    with pytest.raises(UserError) as e:
        config_mod.load_pretrain_config("demo", [item])
    assert needle in str(e.value), str(e.value)
    cfg = config_mod.load_pretrain_config("demo", ["train.knn_temperature=0.02", "train.dist_timeout_s=2592000"])
    assert (cfg.train.knn_temperature, cfg.train.dist_timeout_s) == (0.02, 2592000.0)


def test_amendments_alias_bomb_is_refused_on_resume(tiny_npz, tmp_path):
    """A YAML alias bomb in ``config.amendments.yaml`` is refused by the bounded loader (one line, exit 2) instead
    of expanding in memory on ``--resume``."""
    from helpers import cli, tiny_overrides

    out = tmp_path / "run"
    r = cli("pretrain", "--output", out, sets=tiny_overrides(str(tiny_npz)))
    assert r.exit_code == 0, r.output
    levels = ["- &l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"- &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]  # 9**9 items if expanded
    bomb = "\n".join(levels) + "\n"
    (out / "config.amendments.yaml").write_text(bomb)
    r = cli("pretrain", "--output", out, "--resume", sets=["optim.epochs=2"])
    assert r.exit_code == 2, r.output
    assert "config.amendments.yaml" in r.output and "alias" in r.output.lower()


# ----------------------------------------------------------------------------------------- issue 24, part B
# 16-bit images: every place that decodes an image file uses the one rule (simsiam_kit.data.to_rgb)
_WIDE = np.array([[0, 257, 32896, 65535], [12850, 1000, 8224, 4112]], dtype=np.uint16)  # 0 1 128 255 / 50 4 32 16
_WIDE_8BIT = [[0, 1, 128, 255], [50, 4, 32, 16]]


def _wide_png(path: Path, reps: int = 1) -> Path:
    from PIL import Image

    Image.fromarray(np.kron(_WIDE, np.ones((reps, reps), np.uint16))).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # Pillow decodes a 16-bit PNG to a wide mode
    return path


def test_detection_reader_scales_16_bit_images(tmp_path):
    from simsiam_kit.evaluation.detection.data import DetectionSet
    from simsiam_kit.evaluation.detection.torchvision_engine import DetectionTorchDataset

    rec = {
        "image_id": 1,
        "file": _wide_png(tmp_path / "x.png"),
        "width": 4,
        "height": 2,
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int64),
        "iscrowd": np.zeros(0, np.int64),
    }
    img, _ = DetectionTorchDataset(DetectionSet("x", tmp_path, [rec], []), train=False)[0]
    assert img.shape == (3, 2, 4)
    assert (img * 255).round().int()[0].tolist() == _WIDE_8BIT and (img[0] == img[2]).all()


def test_plot_reader_and_served_images_scale_16_bit_images(tmp_path):
    from simsiam_kit.engine.loggers import png_to_array
    from simsiam_kit.retrieval.gallery import open_image

    p = _wide_png(tmp_path / "x.png")
    assert png_to_array(p)[..., 0].tolist() == _WIDE_8BIT
    assert np.asarray(open_image(p))[..., 1].tolist() == _WIDE_8BIT


def test_detection_predictions_png_shows_16_bit_images_as_they_are(tmp_path):
    """The predictions figure: a dark 16-bit image (8-bit 16) drawn dark, not clipped to white."""
    from PIL import Image

    from simsiam_kit.evaluation.detection.visualize import save_predictions_png

    p = tmp_path / "dark.png"
    Image.fromarray(np.full((48, 64), 4112, np.uint16)).save(p)
    rec = {"file": p, "boxes": np.zeros((0, 4))}
    pred = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    out = save_predictions_png([rec], [pred], ["a"], tmp_path / "pred.png")
    with Image.open(out) as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    assert rgb[h // 2, w // 2].tolist() == [16, 16, 16], rgb[h // 2, w // 2]
