"""Untrusted files (issue 11, part B): what a small hostile file can make the program allocate or run.

Each bound is tested by making the allocating (or executing) function fail the test if it is reached:
the check must come first, not merely fail fast. The end-to-end rows (one stderr line, exit 2) are in
``tests/test_bad_inputs.py``; the hostile inputs themselves in ``tests/hostile.py``."""

from __future__ import annotations

import json
import os
import pickle
import posix
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
        (lambda p, m: hostile.pickle_foreign_class(p), "global 'hostile.Foreign'"),
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
