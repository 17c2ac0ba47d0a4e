"""ONNX export: parity with PyTorch, metadata round trip, heads, fp16, and bad input through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")  # the [cpu] or [gpu] extra
import onnx  # noqa: E402  (onnx and onnxscript are hard dependencies)

from simsiam_kit.cli import app  # noqa: E402
from simsiam_kit.engine.checkpoint import save_backbone, save_checkpoint  # noqa: E402
from simsiam_kit.export.embedder import OnnxEmbedder, preprocess, read_metadata  # noqa: E402
from simsiam_kit.export.onnx import ParityError, export_onnx  # noqa: E402
from simsiam_kit.models import build_backbone  # noqa: E402

from helpers import DATA, needs_shared

SHARED = DATA
CIFAR_VAL = SHARED / "cifar10" / "val.npz"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
runner = CliRunner()


def _backbone(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # zero_init_residual=False: with zeroed last BNs every block is the identity, a weak parity test
    m = build_backbone("resnet18", "cifar", zero_init_residual=False)
    with torch.no_grad():  # move BN running statistics away from (0, 1) so they matter
        m.train()
        m(torch.randn(8, 3, 32, 32))
    return m.eval()


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx_bb")
    m = _backbone(0)
    path = d / "backbone.pt"
    save_backbone(path, m, "resnet18", "cifar", {"image_size": 32, "mean": list(MEAN), "std": list(STD)})
    return path, m


@pytest.fixture(scope="module")
def exported(bb, tmp_path_factory):
    """One export through the CLI, shared by the tests below."""
    out = tmp_path_factory.mktemp("onnx_out") / "enc.onnx"
    real = f"{CIFAR_VAL}[:9]" if CIFAR_VAL.is_file() else "demo:val[:9]"
    res = runner.invoke(app, ["export", "onnx", "--weights", str(bb[0]), "--output", str(out), "--parity-data", real])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_cli_export_writes_checked_model_report_and_parity(exported):
    out, text = exported
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    rep = json.loads(out.with_name("enc.export.json").read_text())
    p = rep["parity"]
    assert p["passed"] and p["criterion"] == "max abs diff <= 0.0001 x max(1, max |output|)"
    seen = {(c["images"], c["batch"]) for c in p["checks"]}
    assert {("random", 1), ("random", 7), ("real", 1), ("real", 7), ("real", 9)} <= seen
    assert all(c["max_abs_diff"] <= 1e-4 and c["min_cosine"] > 0.9999 for c in p["checks"])
    assert "random batch   7" in text and "parity passed" in text
    # input/output layout: dynamic batch, fixed 3x32x32
    g = onnx.load(str(out)).graph
    dims = [(d.dim_param or d.dim_value) for d in g.input[0].type.tensor_type.shape.dim]
    assert g.input[0].name == "images" and g.output[0].name == "embeddings"
    assert isinstance(dims[0], str) and dims[1:] == [3, 32, 32]


def test_metadata_round_trip(exported):
    meta = read_metadata(exported[0])
    assert meta["image_size"] == 32 and meta["embedding_dim"] == 512
    assert meta["mean"] == pytest.approx(MEAN, abs=0) and meta["std"] == pytest.approx(STD, abs=0)
    assert (meta["arch"], meta["stem"], meta["head"], meta["channel_order"]) == ("resnet18", "cifar", "backbone", "RGB")
    assert (meta["input_layout"], meta["output_normalization"], meta["precision"], meta["opset"]) == (
        "NCHW",
        "none",
        "fp32",
        18,
    )
    emb = OnnxEmbedder(exported[0])
    assert (emb.image_size, emb.mean, emb.std, emb.dim) == (32, MEAN, STD, 512)
    assert emb.provider == "CPUExecutionProvider" or emb.provider == "CUDAExecutionProvider"


@pytest.mark.parametrize("batch", [1, 7])
def test_parity_with_pytorch_at_batch(exported, bb, batch):
    emb = OnnxEmbedder(exported[0], normalize=False)
    imgs = np.random.default_rng(batch).integers(0, 256, size=(batch, 32, 32, 3), dtype=np.uint8)
    x = preprocess(imgs, 32, MEAN, STD)
    with torch.no_grad():
        ref = bb[1](torch.from_numpy(x)).numpy()
    got = emb.embed(imgs)
    assert got.shape == (batch, 512)
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero arrays


@needs_shared(CIFAR_VAL)
def test_embedder_matches_pytorch_feature_extraction(exported, bb):
    from simsiam_kit.data.datasets import load_dataset
    from simsiam_kit.features import extract_features

    ds = load_dataset(f"{CIFAR_VAL}[:20]")
    ref, _, _ = extract_features(bb[1], ds, torch.device("cpu"), batch_size=8, mean=MEAN, std=STD, image_size=32)
    got = OnnxEmbedder(exported[0], batch_size=6).embed(ds.images)
    assert np.abs(got - ref.numpy()).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # PIL images and a file path give the same embeddings as uint8 arrays
    from PIL import Image

    pil = [Image.fromarray(a) for a in ds.images[:3]]
    assert np.abs(OnnxEmbedder(exported[0]).embed(pil) - got[:3]).max() < 1e-6


def test_projector_head_from_run_dir(tmp_path):
    from simsiam_kit.config import ModelConfig
    from simsiam_kit.models import build_simsiam

    cfg = ModelConfig(
        arch="resnet18",
        stem="cifar",
        zero_init_residual=False,
        proj_dim=48,
        proj_hidden=40,
        proj_layers=2,
        pred_hidden=16,
    )
    torch.manual_seed(1)
    model = build_simsiam(cfg)
    with torch.no_grad():
        model.train()
        model.encode(torch.randn(8, 3, 32, 32))  # non-trivial BN running statistics
    model.eval()
    run = tmp_path / "run"
    save_checkpoint(
        run / "checkpoints" / "last.pt",
        model=model.state_dict(),
        config={"model": {"arch": "resnet18", "stem": "cifar"}, "data": {"image_size": 32}},
    )
    save_backbone(run / "backbone.pt", model.backbone, "resnet18", "cifar", {"image_size": 32})
    rep = export_onnx(str(run), tmp_path / "proj.onnx", head="projector", parity_data=None)
    assert rep["parity"]["passed"] and rep["metadata"]["head"] == "projector"
    emb = OnnxEmbedder(tmp_path / "proj.onnx", normalize=False)
    assert emb.dim == 48
    imgs = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(emb.preprocess(imgs))).numpy()
    assert np.abs(emb.embed(imgs) - ref).max() <= 1e-4

    # the projector is not in backbone.pt: a clear error, exit 2
    res = runner.invoke(
        app,
        [
            "export",
            "onnx",
            "--weights",
            str(run / "backbone.pt"),
            "--output",
            str(tmp_path / "x.onnx"),
            "--head",
            "projector",
        ],
    )
    assert res.exit_code == 2 and "needs a full simsiam-kit checkpoint" in res.output


@pytest.mark.slow  # a second full export (~10 s on 2 cores); run with -m slow
def test_fp16_export_meets_cosine_criterion(bb, tmp_path):
    rep = export_onnx(str(bb[0]), tmp_path / "h.onnx", fp16=True, parity_data=None)
    p = rep["parity"]
    assert p["passed"] and p["criterion"] == "min cosine >= 0.999" and p["min_cosine"] >= 0.999
    assert read_metadata(tmp_path / "h.onnx")["precision"] == "fp16"
    assert rep["size_bytes"] < 30e6  # float16 weights: about half of the 45 MB fp32 ResNet-18
    imgs = np.random.default_rng(3).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    assert OnnxEmbedder(tmp_path / "h.onnx").embed(imgs).dtype == np.float32


def test_parity_failure_fails_loudly_and_writes_nothing(bb, exported, tmp_path, monkeypatch):
    """A graph that does not compute the given weights (here: another network's) must be refused."""
    import simsiam_kit.export.onnx as eo

    other = tmp_path / "other.pt"
    save_backbone(other, _backbone(5), "resnet18", "cifar", {"image_size": 32, "mean": list(MEAN), "std": list(STD)})
    wrong = onnx.load(str(exported[0]))  # computes the fixture's backbone, not _backbone(5)
    monkeypatch.setattr(eo, "to_onnx", lambda net, size, opset: wrong)
    with pytest.raises(ParityError, match="parity check failed"):
        export_onnx(str(other), tmp_path / "bad.onnx", parity_data=None)
    assert not (tmp_path / "bad.onnx").exists()
    rep = json.loads((tmp_path / "bad.export.json").read_text())
    assert rep["parity"]["passed"] is False and rep["parity"]["max_abs_diff"] > 1e-4
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_model_is_written_before_its_report_both_atomically(bb, exported, tmp_path, monkeypatch):
    """The graph of the same weights (the fixture's export, so no second trace): parity passes, and the model
    lands before export.json, each through the project's atomic writer."""
    import simsiam_kit.export.onnx as eo

    same = onnx.load(str(exported[0]))
    monkeypatch.setattr(eo, "to_onnx", lambda net, size, opset: same)
    order = []
    for name in ("atomic_write_bytes", "atomic_write_json"):
        real = getattr(eo, name)
        monkeypatch.setattr(eo, name, lambda path, obj, real=real: (order.append(path.name), real(path, obj)))
    out = tmp_path / "sub" / "ok.onnx"
    rep = eo.export_onnx(str(bb[0]), out, eo.OnnxExportOptions(parity_data=None, device="cpu"))
    assert order == ["ok.onnx", "ok.export.json"]
    assert rep["parity"]["passed"] and json.loads(out.with_name("ok.export.json").read_text()) == rep
    assert read_metadata(out)["arch"] == "resnet18" and not list(out.parent.glob(".*.tmp"))


def test_options_are_checked_before_anything_is_loaded(tmp_path):
    from simsiam_kit.errors import UserError
    from simsiam_kit.export.onnx import OnnxExportOptions

    missing = str(tmp_path / "no-such-weights.pt")
    with pytest.raises(UserError, match="unsupported opset 13"):
        export_onnx(missing, tmp_path / "m.onnx", OnnxExportOptions(opset=13))
    with pytest.raises(UserError, match="apply to --quantize int8 only"):  # keyword fields override the options
        export_onnx(missing, tmp_path / "m.onnx", OnnxExportOptions(), accuracy_data="demo:val")
    with pytest.raises(TypeError):
        export_onnx(missing, tmp_path / "m.onnx", no_such_option=1)


# ----------------------------------------------------------------------------- bad input, exit 2
def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_weights_that_do_not_load(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    res = _cli("export", "onnx", "--weights", bad, "--output", tmp_path / "m.onnx")
    assert res.exit_code == 2 and "cannot load" in res.output and str(bad) in res.output
    res = _cli("export", "onnx", "--weights", tmp_path / "missing", "--output", tmp_path / "m.onnx")
    assert res.exit_code == 2 and "weights not found" in res.output


def test_unsupported_opset_and_head(bb, tmp_path):
    res = _cli("export", "onnx", "--weights", bb[0], "--output", tmp_path / "m.onnx", "--opset", "13")
    assert res.exit_code == 2 and "unsupported opset 13" in res.output
    res = _cli("export", "onnx", "--weights", bb[0], "--output", tmp_path / "m.onnx", "--head", "predictor")
    assert res.exit_code == 2 and "unknown head 'predictor'" in res.output
    assert not (tmp_path / "m.onnx").exists()


def test_corrupt_or_foreign_onnx_file(tmp_path):
    from onnx import TensorProto, helper

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    res = _cli("embed", "--model", corrupt, "--data", "demo:val[:4]", "--output", tmp_path / "e")
    assert res.exit_code == 2 and "corrupt.onnx" in res.output and "ONNX model" in res.output
    # a valid ONNX model that is not a simsiam-kit encoder (no metadata)
    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(g), str(tmp_path / "foreign.onnx"))
    res = _cli("embed", "--model", tmp_path / "foreign.onnx", "--data", "demo:val[:4]", "--output", tmp_path / "e")
    assert res.exit_code == 2 and "not a simsiam-kit encoder" in res.output


@pytest.mark.parametrize(
    "scale, error, passed",
    [
        (1000.0, 5e-4, True),  # features of magnitude ~1000: 5e-4 is fp32-rounding size (5e-7 relative)
        (1000.0, 0.2, False),  # 2e-4 relative: a real mismatch
        (1.0, 5e-4, False),  # features up to 1: the absolute 1e-4 floor holds
        (1.0, 5e-5, True),
    ],
)
def test_fp32_parity_tolerance_scales_with_the_output(scale, error, passed):
    """max |diff| <= 1e-4 x max(1, max |output|), worked by hand on a stand-in net and session."""
    from simsiam_kit.export.onnx import parity_check

    class Net(torch.nn.Module):  # pooled pixels, scaled: max |output| = scale x max |input|
        def forward(self, x):
            return x.mean((2, 3)) * scale / x.abs().amax()

    class Session:  # onnxruntime stand-in: the net's output plus a known error on one element
        def run(self, names, feeds):
            out = Net()(torch.from_numpy(feeds["images"])).numpy().copy()
            out[0, 0] += error
            return [out]

    p = parity_check(Net(), Session(), 8, MEAN, STD, None, fp16=False)
    assert p["passed"] is passed
    assert p["max_abs_diff"] == pytest.approx(error, rel=1e-2)
    assert all(c["tolerance"] == pytest.approx(1e-4 * max(1.0, c["max_abs_value"])) for c in p["checks"])
