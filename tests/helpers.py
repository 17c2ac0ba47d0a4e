"""Shared test helpers: paths of the shared data, the skip/fail rule for it, the tiny-run overrides and one
``cli`` helper around Typer's CliRunner. Fixtures built on these live in ``conftest.py``."""

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures"
CIFAR_VAL = DATA / "cifar10" / "val.npz"


def need(path: Path) -> Path:
    """Shared data for a test: skipped where it is absent, but under CI=true (``.ci/run``) its absence fails
    the test, so a CI run can never pass by skipping everything that reads real data."""
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"shared data missing under CI=true: {path}")
        pytest.skip(f"shared data not available: {path}")
    return path


def needs_shared(*paths: Path):
    """A skip mark for tests that read ../shared; under CI=true it never skips (the test then fails on the
    missing file), so CI cannot pass by skipping everything that reads real data."""
    missing = [p for p in paths if not p.exists()]
    ci = os.environ.get("CI", "").lower() == "true"
    return pytest.mark.skipif(bool(missing) and not ci, reason=f"shared data not available: {missing[:1]}")


def tiny_overrides(train: str, val: str | None = None, epochs: int = 1, batch: int = 16) -> list[str]:
    """--set overrides for a seconds-long run: small heads, 16 px, fp32, no plots."""
    return [
        f"data.train={train}",
        f"data.val={val if val else 'null'}",
        "data.image_size=16",
        "model.proj_dim=64",
        "model.proj_hidden=64",
        "model.pred_hidden=16",
        f"optim.epochs={epochs}",
        f"optim.batch_size={batch}",
        "train.progress=false",
        "train.precision=fp32",
        "train.knn_every=1",
        "train.knn_k=5",
        "train.log_every=1",
        "train.plots=false",
    ]


def write_tiny_npz(path: Path, n: int = 48, classes: int = 3, size: int = 16) -> Path:
    """``n`` real CIFAR images of the first ``classes`` classes (centre ``size`` px crops of val.npz) as an npz with
    labels and class names."""
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with np.load(need(CIFAR_VAL)) as d:
        keep = np.flatnonzero(d["labels"] < classes)[:n]
        lo = (32 - size) // 2
        images = np.ascontiguousarray(d["images"][keep][:, lo : lo + size, lo : lo + size])
        labels = d["labels"][keep]
    np.savez(path, images=images, labels=labels, class_names=np.array(names[:classes]))
    return path


def cli(*args, sets=(), input=None, env=None):
    """Run ``simsiam-kit ARGS`` in-process through Typer's CliRunner; ``sets`` become ``--set`` pairs."""
    from typer.testing import CliRunner

    from simsiam_kit.cli.app import app

    argv = [str(a) for a in args]
    for s in sets:
        argv += ["--set", str(s)]
    return CliRunner().invoke(app, argv, input=input, env=env)


def _save_onnx_encoder(path: Path, nodes, name: str, size: int, dim: int, arch: str, initializer=()) -> Path:
    """Save a hand-built graph (``images`` [batch, 3, size, size] -> ``embeddings`` [batch, dim]) with the
    metadata simsiam-kit's export writes, so the embedder loads it like an exported encoder."""
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", dim])],
        initializer=list(initializer),
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    meta = {
        "format": "simsiam-kit-onnx-encoder",
        "image_size": str(size),
        "mean": "[0.485, 0.456, 0.406]",
        "std": "[0.229, 0.224, 0.225]",
        "channel_order": "RGB",
        "embedding_dim": str(dim),
        "input_name": "images",
        "output_name": "embeddings",
        "arch": arch,
        "head": "backbone",
    }
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def write_thumbnail_encoder(path: Path, size: int = 32, pool: int = 4) -> Path:
    """A simsiam-kit 'encoder' made by hand: the embedding is the normalised image average-pooled to
    (size / pool)^2 cells, 3 x 64 = 192 numbers at the defaults, so different photos differ."""
    from onnx import helper

    nodes = [
        helper.make_node("AveragePool", ["images"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("Flatten", ["pooled"], ["embeddings"], axis=1),
    ]
    return _save_onnx_encoder(path, nodes, "thumbnail", size, (size // pool) ** 2 * 3, "thumbnail")


def conv_onnx_encoder(path: Path, size: int = 8, dim: int = 8, seed: int = 0) -> Path:
    """A small simsiam-kit ONNX 'encoder' with fixed random weights (3x3 conv, ReLU, global mean pool: D = ``dim``)
    for ``size`` px inputs, so embed tests run real convolutions in seconds."""
    from onnx import helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((dim, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["embeddings"], axis=1),
    ]
    return _save_onnx_encoder(path, nodes, "conv_pool", size, dim, "conv-pool", [numpy_helper.from_array(w, "w")])


def run_ranks(target, args: tuple = (), world: int = 2, timeout: float = 240) -> dict:
    """Run ``target(rank, port, *args, queue)`` in ``world`` spawned processes (a free loopback port for their gloo
    group) and return ``{rank: rest}`` of the tuple ``(rank, *rest)`` each puts on ``queue``; processes still alive
    after the results (or a timeout) are joined, then killed."""
    import socket

    import torch.multiprocessing as mp

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return {r[0]: r[1:] for r in (q.get(timeout=timeout) for _ in range(world))}
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
