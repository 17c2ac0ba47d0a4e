"""One evaluation-time preprocessing rule end to end: the features ``eval knn`` computes, the vectors
``embed`` (OnnxEmbedder) computes and those of a plain onnxruntime session that knows only the ONNX
metadata are the same vectors, for in-memory images at another size than the model's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from simsiam_kit.data.datasets import load_dataset
from simsiam_kit.features import extract_features
from simsiam_kit.image_settings import eval_resize_crop
from simsiam_kit.models import build_backbone

SIZE = 24  # demo images are 32 px: resized (shorter side to round(24 / 0.875) = 27) and centre-cropped


def _metadata_preprocess(images: np.ndarray, meta: dict) -> np.ndarray:
    """What a user writes from the metadata alone: PIL bilinear resize of the shorter side, centre crop."""
    from PIL import Image

    size = int(meta["image_size"])
    short = int(round(size / 0.875))
    out = []
    for a in images:
        im = Image.fromarray(a).resize((short, short), Image.BILINEAR)  # square inputs: both sides
        top = left = int(round((short - size) / 2.0))
        out.append(np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0)
    x = (np.stack(out) - np.asarray(json.loads(meta["mean"]), np.float32)) / np.asarray(
        json.loads(meta["std"]), np.float32
    )
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).astype(np.float32))


def test_eval_embed_and_plain_onnxruntime_give_the_same_vectors(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.export.onnx import export_onnx

    torch.manual_seed(0)
    net = build_backbone("resnet18", "cifar", zero_init_residual=False).eval()
    w = tmp_path / "bb.pth"
    torch.save(net.state_dict(), w)
    model = tmp_path / "enc.onnx"
    export_onnx(str(w), model, image_size=SIZE, parity_data=None, device="cpu")
    ds = load_dataset("demo:val[:12]")
    assert ds.images.shape[1:3] == (32, 32)

    feats, _, _ = extract_features(net, ds, torch.device("cpu"), image_size=SIZE)  # eval knn's call
    emb = OnnxEmbedder(model, device="cpu").embed(ds.images)  # embed's model
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert "PIL" in meta["resize"] and "antialias" in meta["resize"] and "0.875" in meta["resize"]
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    raw = sess.run([meta["output_name"]], {meta["input_name"]: _metadata_preprocess(ds.images, meta)})[0]
    plain = raw / np.linalg.norm(raw, axis=1, keepdims=True)

    f = feats.numpy()
    assert np.abs(f - emb).max() < 1e-4
    assert np.abs(f - plain).max() < 1e-4
    # the rule is the function all three go through; a squash (the old in-memory rule) is not it
    squash = torch.nn.functional.interpolate(
        torch.from_numpy(ds.images).permute(0, 3, 1, 2).float(), size=(SIZE, SIZE), mode="bilinear", antialias=True
    )
    assert not np.array_equal(
        squash.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()[0], eval_resize_crop(ds.images[0], SIZE)
    )
