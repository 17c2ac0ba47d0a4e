"""``simsiam-kit embed``: the streaming, sharded, resumable embedding of simsiam_kit/retrieval/pipeline.py, with
the ONNX model (``export.OnnxEmbedder``) or the torch encoder (``retrieval.torch_runtime.TorchEmbedder``) passed in
as the model. Registered after ``cli/onnx.py``'s app, whose ``embed`` it replaces (``search`` stays there)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from simsiam_kit.cli.common import EMBED_REMEDIES, user_errors
from simsiam_kit.cli.index import ACTORS_HELP, ENGINE_HELP, RAY_ADDRESS_HELP
from simsiam_kit.cli.options import SkipBadImages, new_app, precheck

app = new_app()  # simsiam-kit embed


@app.command("embed")
@user_errors(remedies=EMBED_REMEDIES)
def embed_cmd(
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Dataset spec: ImageFolder dir, .npz, a .txt/.parquet list of image paths, WebDataset tar shards "
        "('shards/{00000..00099}.tar'), cifar10, ... (slice with [a:b]).",
    ),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="Directory for the shards (manifest.json, shards/), embeddings.npy, ids.json, labels.npy, the index.",
    ),
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", help="Encoder exported with `simsiam-kit export onnx` (--runtime onnx)."
    ),
    runtime: str = typer.Option(
        "onnx",
        "--runtime",
        help="onnx (the --model file, onnxruntime) or torch (the --weights encoder; bf16 + channels_last where "
        "the CPU has them).",
    ),
    weights: Optional[str] = typer.Option(
        None, "--weights", "-w", help="--runtime torch: run directory, checkpoint or backbone.pt."
    ),
    head: str = typer.Option("backbone", "--head", help="--runtime torch: backbone or projector."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per encoder call."),
    index: str = typer.Option(
        "flat",
        "--index",
        help="flat (exact), ivf or hnsw (approximate, FAISS), bf16 (approximate, --backend torch), or none "
        "(shards only).",
    ),
    backend: str = typer.Option("faiss", "--backend", help="faiss, or torch (exact flat search without FAISS)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda."),
    shard_size: Optional[int] = typer.Option(
        None, "--shard-size", help="Input images per shard (default: 10000, pipeline.DEFAULT_SHARD_SIZE)."
    ),
    dtype: str = typer.Option("float32", "--dtype", help="Shard embeddings: float32 or float16."),
    workers: Optional[int] = typer.Option(
        None, "--workers", help="Decoding worker processes (default: the cores but one; 0: in this process)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --output from its finished shards (a killed run)."
    ),
    skip_bad_images: SkipBadImages = False,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (images/s, ETA)."),
    engine: str = typer.Option("local", "--engine", help=ENGINE_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    actors: Optional[int] = typer.Option(None, "--actors", help=ACTORS_HELP),
):
    """Embed a dataset in shards (resumable) with an exported encoder or the torch one, and build an index."""
    from simsiam_kit.errors import UserError

    if runtime not in ("onnx", "torch"):
        raise UserError(f"--runtime {runtime}: expected onnx or torch")
    if runtime == "onnx":
        if model is None:
            raise UserError("--model FILE.onnx is needed (or --runtime torch --weights RUN)")
        if not model.is_file():
            raise UserError(f"--model {model}: no such file (an encoder written by 'simsiam-kit export onnx')")
        if weights is not None:
            raise UserError("--weights goes with --runtime torch; --runtime onnx reads --model")
    else:
        if weights is None:
            raise UserError("--runtime torch needs --weights (a run directory, checkpoint or backbone.pt)")
        if model is not None:
            raise UserError("--model goes with --runtime onnx; --runtime torch reads --weights")
    precheck(data=[("--data", data)])
    from simsiam_kit.retrieval.pipeline import DEFAULT_SHARD_SIZE, embed_to_dir
    from simsiam_kit.retrieval.shards import DTYPES

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected {' or '.join(DTYPES)}")
    if engine == "ray" and runtime != "onnx":
        raise UserError("--engine ray runs the ONNX encoder (--model); --runtime torch is local only")
    from simsiam_kit.cli.index import embed_engine

    run_engine = embed_engine(engine, model, data, device, batch_size, ray_address, actors)

    embed_to_dir(
        _embedder(runtime, model, weights, head, device, batch_size),
        data,
        output,
        index_kind=index,
        backend=backend,
        shard_size=DEFAULT_SHARD_SIZE if shard_size is None else shard_size,
        dtype=dtype,
        resume=resume,
        skip_bad_images=skip_bad_images,
        workers=workers,
        progress=progress,
        log=typer.echo,
        engine=run_engine,
    )


def _embedder(runtime: str, model, weights, head: str, device: str, batch_size: int):
    """The encoder runtime: an ``OnnxEmbedder``, or the torch encoder of ``weights`` with the exported model's
    preprocessing (``export.embedder.preprocess`` with the encoder's image size, mean and std)."""
    if runtime == "onnx":
        from simsiam_kit.export.embedder import OnnxEmbedder

        return OnnxEmbedder(model, device=device, batch_size=batch_size)
    import functools

    from simsiam_kit.errors import UserError
    from simsiam_kit.export.embedder import preprocess
    from simsiam_kit.export.onnx import load_encoder
    from simsiam_kit.retrieval.torch_runtime import TorchEmbedder
    from simsiam_kit.weights import is_random

    if is_random(weights):
        raise UserError(
            "--runtime torch needs trained weights (a run directory, checkpoint or backbone.pt), not 'random'"
        )
    enc = load_encoder(weights, head=head)
    meta = {
        "arch": enc.arch,
        "stem": enc.stem,
        "head": enc.head,
        "embedding_dim": enc.embedding_dim,
        "image_size": enc.image_size,
        "mean": list(enc.mean),
        "std": list(enc.std),
    }
    pre = functools.partial(preprocess, image_size=enc.image_size, mean=enc.mean, std=enc.std)
    return TorchEmbedder(enc.module, meta, Path(enc.source), pre, batch_size=batch_size, device=device)
