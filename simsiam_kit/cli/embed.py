"""``simsiam-kit embed`` and ``simsiam-kit search``: the core's embed/search application
(:mod:`simsiam_kit.retrieval.embed_search`) with an exported encoder, export's ``OnnxEmbedder``, as its model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from simsiam_kit.cli.common import EMBED_REMEDIES, user_errors
from simsiam_kit.cli.options import SkipBadImages, new_app, precheck

app = new_app()  # simsiam-kit embed, simsiam-kit search


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
    runtime: str = typer.Option(
        "auto",
        "--runtime",
        help="auto (the fastest here, timed on the first batch, cached per machine) | ort-int8 | ort-fp32 (the "
        "model in onnxruntime, by its precision) | torch-bf16 (its source weights, bf16 + channels_last).",
    ),
    skip_bad_images: SkipBadImages = False,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Embed a dataset with an exported encoder (onnxruntime) and build a nearest-neighbour index."""
    from simsiam_kit.errors import UserError

    if not model.is_file():
        raise UserError(f"--model {model}: no such file (an encoder written by 'simsiam-kit export onnx')")
    precheck(data=[("--data", data)])
    from simsiam_kit.export.runtime_choice import open_embedder
    from simsiam_kit.retrieval.embed_search import embed_dataset_to_dir

    embed_dataset_to_dir(
        open_embedder(model, runtime, device=device, batch_size=batch_size, log=typer.echo),
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
    from simsiam_kit.export.runtime_choice import open_for_index
    from simsiam_kit.retrieval.embed_search import format_search_table
    from simsiam_kit.retrieval.pictures import search_with_pictures

    out = output if output is not None else index / "search.json"
    report = search_with_pictures(
        index,
        query,
        lambda path: open_for_index(path, index, device=device, log=lambda s: typer.echo(s, err=True)),
        k=k,
        model=model,
        output=out,
        log=lambda s: typer.echo(s, err=True),
    )
    typer.echo(f"onnxruntime provider: {report['provider']}; {len(report['results'])} queries, k={report['k']}")
    typer.echo(format_search_table(report))
    typer.echo(f"wrote {out}")
    for picture in report["pictures"]:
        typer.echo(f"wrote {picture}")
