"""``simsiam-kit export onnx`` (export/onnx.py), ``simsiam-kit embed`` and ``simsiam-kit search``
(simsiam_kit/retrieval/embed_search.py, with export's ``OnnxEmbedder`` passed in as the model)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from simsiam_kit.cli.common import EMBED_REMEDIES, user_errors
from simsiam_kit.cli.options import SkipBadImages, new_app, precheck
from simsiam_kit.export.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_CALIBRATION_METHOD,
    MIN_CALIBRATION_IMAGES,
    check_options,
)

app = new_app()  # simsiam-kit embed, simsiam-kit search
export_app = new_app()  # simsiam-kit export onnx


@export_app.command("onnx")
@user_errors
def export_onnx_cmd(
    weights: str = typer.Option(
        ..., "--weights", "-w", help="Run directory, checkpoint, backbone.pt or ResNet state dict."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="ONNX file to write (the parity report goes to <stem>.export.json)."
    ),
    head: str = typer.Option(
        "backbone", "--head", help="backbone (pooled features) or projector (z; needs a full checkpoint)."
    ),
    image_size: Optional[int] = typer.Option(
        None,
        "--image-size",
        help="Input size (default: the size stored with the weights, else the run's config, "
        "else 32 for the CIFAR stem, 224 for the ImageNet stem).",
    ),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18-23)."),
    fp16: bool = typer.Option(
        False, "--fp16", help="float16 weights and arithmetic (I/O stays float32); parity: cosine >= 0.999."
    ),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture for a plain state dict or --weights random."),
    parity_data: str = typer.Option(
        "demo:val[:16]", "--parity-data", help="Real images for the parity check (dataset spec)."
    ),
    device: str = typer.Option("auto", "--device", help="onnxruntime device for the parity check: auto, cpu or cuda."),
    quantize: Optional[str] = typer.Option(
        None,
        "--quantize",
        help="int8: static quantization (onnxruntime, QDQ: int8 weights, uint8 activations) of the checked "
        "fp32 graph, calibrated on --calibration-data; the int8 model must keep kNN top-1 within 0.5 points "
        "of fp32 on --accuracy-data or it is not written.",
    ),
    calibration_data: Optional[str] = typer.Option(
        None,
        "--calibration-data",
        help="With --quantize: your images to set the int8 ranges (dataset spec; --calibration-images of "
        "them, evenly spaced).",
    ),
    calibration_images: int = typer.Option(
        DEFAULT_CALIBRATION_IMAGES,
        "--calibration-images",
        help=f"With --quantize: images taken from --calibration-data (at least {MIN_CALIBRATION_IMAGES}).",
    ),
    calibration_method: str = typer.Option(
        DEFAULT_CALIBRATION_METHOD, "--calibration-method", help="With --quantize: minmax or percentile (99.999)."
    ),
    accuracy_data: Optional[str] = typer.Option(
        None,
        "--accuracy-data",
        help="With --quantize: labelled images (dataset spec) for the accuracy check: kNN top-1 (k=200, T=0.1) "
        "of int8 vs fp32 embeddings, two-fold (even rows are the bank of odd rows and back); 1,000+ images.",
    ),
):
    """Export the encoder to ONNX (dynamic batch, preprocessing in metadata_props) and check it against PyTorch."""
    check_options(quantize, fp16, calibration_data, accuracy_data, calibration_images, calibration_method)
    specs = [("--parity-data", parity_data)]
    if quantize:
        specs += [("--calibration-data", calibration_data), ("--accuracy-data", accuracy_data)]
    precheck(weights, None, specs, image_size=image_size)
    from simsiam_kit.export.onnx import export_onnx

    export_onnx(
        weights,
        output,
        head=head,
        image_size=image_size,
        opset=opset,
        fp16=fp16,
        arch=arch,
        parity_data=parity_data,
        device=device,
        log=typer.echo,
        quantize=quantize,
        calibration_data=calibration_data,
        calibration_images=calibration_images,
        calibration_method=calibration_method,
        accuracy_data=accuracy_data,
    )


@app.command("embed")
@user_errors(remedies=EMBED_REMEDIES)
def embed_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="Encoder exported with `simsiam-kit export onnx`."),
    data: str = typer.Option(
        ..., "--data", "-d", help="Dataset spec: ImageFolder dir, .npz, cifar10, ... (slice with [a:b])."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Directory for embeddings.npy, ids.json, labels.npy, the index."
    ),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per onnxruntime call."),
    index: str = typer.Option(
        "flat", "--index", help="flat (exact), ivf or hnsw (approximate, FAISS), bf16 (approximate, --backend torch)."
    ),
    backend: str = typer.Option("faiss", "--backend", help="faiss, or torch (exact flat search without FAISS)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when onnxruntime-gpu sees a GPU), cpu or cuda."),
    skip_bad_images: SkipBadImages = False,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Embed a dataset with an exported encoder (onnxruntime) and build a nearest-neighbour index."""
    from simsiam_kit.errors import UserError

    if not model.is_file():
        raise UserError(f"--model {model}: no such file (an encoder written by 'simsiam-kit export onnx')")
    precheck(data=[("--data", data)])
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.embed_search import embed_dataset_to_dir

    embed_dataset_to_dir(
        OnnxEmbedder(model, device=device, batch_size=batch_size),
        data,
        output,
        index_kind=index,
        backend=backend,
        skip_bad_images=skip_bad_images,
        progress=progress,
        log=typer.echo,
    )


@app.command("search")
@user_errors
def search_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="Directory written by `simsiam-kit embed`."),
    query: Path = typer.Option(..., "--query", "-q", help="An image file or a directory of images."),
    k: int = typer.Option(10, "--k", "-k", help="Neighbours per query."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Encoder (default: the one recorded by `embed`)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON results (default <index>/search.json)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
):
    """Nearest indexed images of each query, with cosine similarities: a table, and JSON."""
    from simsiam_kit.errors import UserError

    if not (index / "embed.json").is_file():
        raise UserError(f"--index {index}: no embed.json there (a directory written by 'simsiam-kit embed')")
    for option, path in (("--query", query), ("--model", model)):
        if path is not None and not path.exists():
            raise UserError(f"{option} {path}: no such file or directory")
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.embed_search import format_search_table, search_images

    out = output if output is not None else index / "search.json"
    report = search_images(
        index,
        query,
        lambda path: OnnxEmbedder(path, device=device),
        k=k,
        model=model,
        output=out,
        log=lambda s: typer.echo(s, err=True),
    )
    typer.echo(f"onnxruntime provider: {report['provider']}; {len(report['results'])} queries, k={report['k']}")
    typer.echo(format_search_table(report))
    typer.echo(f"wrote {out}")
