"""int8 export (``export onnx --quantize int8``): calibration, the kNN accuracy check that replaces the parity
check, metadata, refusals, and the int8 model through ``embed``.

The encoder is a random-init ResNet-18 (CIFAR stem, 32 px) whose BatchNorm statistics are measured on demo
digits, so its embeddings tell digits apart (kNN top-1 ~40 % on demo:val, chance 10 %) and int8 errors show.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")  # the [cpu] or [gpu] extra

from simsiam_kit.cli import app  # noqa: E402
from simsiam_kit.data.datasets import load_dataset  # noqa: E402
from simsiam_kit.engine.checkpoint import save_backbone  # noqa: E402
from simsiam_kit.errors import UserError  # noqa: E402
from simsiam_kit.export.embedder import OnnxEmbedder, decode_metadata, preprocess, read_metadata  # noqa: E402
from simsiam_kit.models import build_backbone  # noqa: E402

MEAN, STD = (0.1307,) * 3, (0.3081,) * 3  # MNIST's, the demo digits
runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    """Backbone file and module: random init, BN running statistics measured on 128 demo digits."""
    torch.manual_seed(0)
    m = build_backbone("resnet18", "cifar", zero_init_residual=False)
    x = torch.from_numpy(preprocess(load_dataset("demo:train[:128]").images, 32, MEAN, STD))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None  # cumulative average over the batch
        m.train()
        m(x)
    m.eval()
    path = tmp_path_factory.mktemp("q_bb") / "backbone.pt"
    save_backbone(path, m, "resnet18", "cifar", {"image_size": 32, "mean": list(MEAN), "std": list(STD)})
    return path, m


@pytest.fixture(scope="module")
def int8_export(bb, tmp_path_factory):
    """One int8 export through the CLI: 64 calibration digits, the accuracy check on the 1,000 demo:val digits."""
    out = tmp_path_factory.mktemp("q_out") / "enc8.onnx"
    res = _cli(
        "export", "onnx", "--weights", bb[0], "--output", out, "--parity-data", "demo:val[:8]",
        "--quantize", "int8", "--calibration-data", "demo:train[:64]", "--accuracy-data", "demo:val",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return out, res.output


def test_int8_export_metadata_report_and_accuracy(int8_export):
    out, text = int8_export
    meta = read_metadata(out)
    assert meta["precision"] == "int8" and meta["image_size"] == 32 and meta["embedding_dim"] == 512
    calib = json.loads(meta["calibration"])
    assert calib["calibration_images"] == 64 and calib["calibration_data"] == "demo:train[:64]"
    assert (calib["format"], calib["calibration_method"], calib["excluded_nodes"]) == ("QDQ", "minmax", [])
    rep = json.loads(out.with_name("enc8.export.json").read_text())
    acc = rep["accuracy"]
    assert acc["passed"] and (acc["k"], acc["temperature"], acc["images"]) == (200, 0.1, 1000)
    # a real case: the fp32 embeddings are far above chance (10 %), and int8 stays within 0.5 points
    assert acc["fp32_top1"] > 30.0
    assert acc["difference"] == pytest.approx(acc["int8_top1"] - acc["fp32_top1"]) and acc["difference"] >= -0.5
    assert acc["cosine_int8_vs_fp32"]["mean"] > 0.99 and acc["cosine_int8_vs_fp32"]["min"] > 0.98
    assert json.loads(meta["accuracy_check"])["int8_top1"] == acc["int8_top1"]
    assert rep["parity"]["passed"] and rep["parity"]["graph"] == "the fp32 graph before quantization"
    assert rep["size_bytes"] < 0.4 * rep["fp32_size_bytes"]  # int8 weights: about a quarter of fp32
    assert "kNN top-1 (k=200, T=0.1, 1000 images)" in text and "int8 accuracy check passed" in text
    # the graph really is quantized: QuantizeLinear/DequantizeLinear pairs around int8 weights
    import onnx

    g = onnx.load(str(out)).graph
    ops = {n.op_type for n in g.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in g.initializer)


def test_int8_embeddings_close_to_pytorch_fp32(int8_export, bb):
    imgs = load_dataset("demo:val[:40]").images
    emb = OnnxEmbedder(int8_export[0])
    got = emb.embed(imgs)
    with torch.no_grad():
        ref = bb[1](torch.from_numpy(preprocess(imgs, 32, MEAN, STD))).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    cos = (got * ref).sum(1)
    assert cos.min() > 0.98 and cos.mean() > 0.99
    assert np.abs(got - ref).max() > 1e-4  # it is not the fp32 graph under another name


def test_embed_runs_the_int8_model(int8_export, tmp_path):
    res = _cli("embed", "--model", int8_export[0], "--data", "demo:val[:20]", "--output", tmp_path / "e",
               "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    z = np.load(tmp_path / "e" / "embeddings.npy")
    assert z.shape == (20, 512) and np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert json.loads((tmp_path / "e" / "embed.json").read_text())["model_metadata"]["precision"] == "int8"
    assert np.abs(z - OnnxEmbedder(int8_export[0]).embed(load_dataset("demo:val[:20]").images)).max() < 1e-6


def test_broken_calibration_fails_the_accuracy_check(bb, tmp_path):
    """Ranges measured on black images clip every real activation: the check must refuse the model."""
    black = tmp_path / "black.npz"
    np.savez(black, images=np.zeros((32, 32, 32, 3), np.uint8))
    out = tmp_path / "bad8.onnx"
    res = _cli("export", "onnx", "--weights", bb[0], "--output", out, "--parity-data", "demo:val[:4]",
               "--quantize", "int8", "--calibration-data", black, "--accuracy-data", "demo:val")  # fmt: skip
    assert res.exit_code == 2, res.output
    assert not out.exists()
    rep = json.loads((tmp_path / "bad8.export.json").read_text())
    acc = rep["accuracy"]
    assert acc["passed"] is False and acc["difference"] < -0.5
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: int8 accuracy check failed")
    assert f"int8 {acc['int8_top1']:.2f}% vs fp32 {acc['fp32_top1']:.2f}%" in last
    assert f"({acc['difference']:+.2f} points" in last and "model not written" in last


def test_impossible_tolerance_fails_through_the_api(bb, tmp_path):
    from simsiam_kit.export.onnx import export_onnx
    from simsiam_kit.export.quantize import AccuracyError

    with pytest.raises(AccuracyError, match=r"kNN top-1 int8 \d+\.\d\d% vs fp32 \d+\.\d\d%"):
        export_onnx(
            str(bb[0]), tmp_path / "t.onnx", parity_data=None, quantize="int8",
            calibration_data=load_dataset("demo:train[:32]").images, accuracy_data="demo:val[:100]",
            knn_k=10, max_top1_drop=-100.0,  # int8 would have to beat fp32 by 100 points
            calibration_method="percentile",
        )  # fmt: skip
    assert not (tmp_path / "t.onnx").exists()
    rep = json.loads((tmp_path / "t.export.json").read_text())
    assert rep["accuracy"]["passed"] is False and rep["accuracy"]["k"] == 10
    assert rep["quantization"]["calibration_data"] == "array (32, 32, 32, 3)"
    assert rep["quantization"]["calibration_method"] == "percentile (99.999)"
    assert rep["accuracy"]["cosine_int8_vs_fp32"]["mean"] > 0.99  # percentile ranges work; the tolerance refused it


def test_percentile_calibration_that_would_not_fit_in_memory_is_refused(bb, tmp_path, monkeypatch):
    """The histogram calibrators keep every activation of every calibration image; the estimate comes from the
    real model's shapes (ResNet-18 CIFAR stem: ~5.7 MB per 32 px image), only the free memory is set here."""
    import simsiam_kit.export.quantize as q
    from simsiam_kit.export.onnx import export_onnx

    monkeypatch.setattr(q, "available_memory", lambda: 64 << 20)
    with pytest.raises(
        UserError,
        match=r"percentile keeps the activations of all 64 calibration images in memory "
        r"\(about 0\.5 GiB for this model; 0\.1 GiB available\): use --calibration-method minmax",
    ):
        export_onnx(
            str(bb[0]),
            tmp_path / "p.onnx",
            parity_data=None,
            quantize="int8",
            calibration_data="demo:train[:64]",
            calibration_method="percentile",
            accuracy_data="demo:val[:100]",
        )
    assert not (tmp_path / "p.onnx").exists()


# ----------------------------------------------------------------------------- refusals, exit 2, one line
def test_quantize_with_fp16_refused(bb, tmp_path):
    res = _cli("export", "onnx", "--weights", bb[0], "--output", tmp_path / "m.onnx", "--quantize", "int8", "--fp16",
               "--calibration-data", "demo:train[:64]", "--accuracy-data", "demo:val")  # fmt: skip
    assert res.exit_code == 2 and "--quantize int8 and --fp16 exclude each other" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--calibration-data", "nope.npz", "--accuracy-data", "demo:val"], "--calibration-data nope.npz: dataset"),
        (["--calibration-data", "demo:val[:10]", "--accuracy-data", "demo:val"], "10 images, int8 calibration needs"),
        (["--accuracy-data", "demo:val"], "--quantize int8 needs --calibration-data SPEC"),
        (["--calibration-data", "demo:val"], "--quantize int8 needs --accuracy-data SPEC"),
        (["--calibration-data", "demo:val", "--accuracy-data", "demo:val", "--calibration-method", "mse"],
         "--calibration-method mse: unknown"),
        (["--calibration-data", "demo:val", "--accuracy-data", "demo:val[:5]"], "5 labelled images"),
    ],
)  # fmt: skip
def test_bad_calibration_or_accuracy_options(bb, tmp_path, args, message):
    res = _cli("export", "onnx", "--weights", bb[0], "--output", tmp_path / "m.onnx", "--quantize", "int8", *args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_unlabelled_accuracy_data_refused(bb, tmp_path):
    unlabelled = tmp_path / "u.npz"
    np.savez(unlabelled, images=load_dataset("demo:val[:40]").images)  # no 'labels': label -1 each
    res = _cli("export", "onnx", "--weights", bb[0], "--output", tmp_path / "m.onnx", "--quantize", "int8",
               "--calibration-data", "demo:train[:32]", "--accuracy-data", unlabelled)  # fmt: skip
    assert res.exit_code == 2 and "images without labels" in res.output and str(unlabelled) in res.output


def test_quantize_options_without_quantize_refused(bb, tmp_path):
    res = _cli("export", "onnx", "--weights", bb[0], "--output", tmp_path / "m.onnx", "--calibration-data", "demo:val")
    assert res.exit_code == 2 and "--calibration-data apply to --quantize int8 only" in res.output


def test_metadata_precision_is_checked():
    raw = {
        "format": "simsiam-kit-onnx-encoder", "image_size": "32", "mean": "[0, 0, 0]", "std": "[1, 1, 1]",
        "channel_order": "RGB", "embedding_dim": "8", "input_name": "images", "output_name": "embeddings",
    }  # fmt: skip
    for p in ("fp32", "fp16", "int8"):
        assert decode_metadata({**raw, "precision": p}, "m.onnx")["precision"] == p
    with pytest.raises(UserError, match="metadata precision 'int4' is not one this embedder runs"):
        decode_metadata({**raw, "precision": "int4"}, "m.onnx")


def test_calibration_batches_use_every_image():
    from simsiam_kit.export.quantize import calibration_batch

    assert [calibration_batch(n) for n in (300, 64, 37, 32, 33, 96)] == [30, 32, 1, 32, 11, 32]
