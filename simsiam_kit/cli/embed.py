"""``simsiam-kit embed`` and ``simsiam-kit search``: the core's streaming embed pipeline
(:mod:`simsiam_kit.retrieval.pipeline`) and search (:mod:`simsiam_kit.retrieval.embed_search`), with the runtime
export chooses (:func:`simsiam_kit.export.runtime_choice.open_runtime`: the exported model in onnxruntime, its
source weights in torch bf16, or the torch encoder of ``--weights``) as the model; ``--engine ray`` runs the
same pipeline on Ray Data (:mod:`simsiam_kit.retrieval.ray_engine`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from simsiam_kit.cli.common import EMBED_REMEDIES, user_errors
from simsiam_kit.cli.options import SkipBadImages, check_writable, new_app, precheck
from simsiam_kit.errors import UserError

app = new_app()  # simsiam-kit embed, simsiam-kit search

RUNTIME_HELP = (
    "auto (the fastest here of the --model file in onnxruntime and its source weights in torch bf16, timed on "
    "the first batch, cached per machine) | ort-int8 | ort-fp32 (the model in onnxruntime, by its precision) | "
    "torch-bf16 (its source weights, bf16 + channels_last) | torch (the --weights encoder, no exported model: "
    "bf16 where the device has it, else fp32; CPU or CUDA)."
)
ENGINE_HELP = (
    "local (this process, decoding in DataLoader workers) or ray (Ray Data: an actor pool, one onnxruntime "
    "session per actor; pip install -e '.[scale]')."
)
#: the kinds ``embed --index`` lists (each one it accepts: tests/retrieval/test_embed_cli.py builds them all)
INDEX_HELP = (
    "flat (exact), ivf or hnsw (approximate, FAISS), bf16 (approximate, torch: bf16 candidates re-scored in "
    "fp32), or none (shards only; then `simsiam-kit index build`, which also builds the compressed kinds)."
)
RAY_ADDRESS_HELP = "With --engine ray: join this Ray cluster (default: $RAY_ADDRESS, else start a local runtime)."
ACTORS_HELP = "With --engine ray: actors in the pool (default: one per CPU of the cluster)."


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
        None, "--model", "-m", help="Encoder exported with `simsiam-kit export onnx` (or --weights)."
    ),
    runtime: str = typer.Option("auto", "--runtime", help=RUNTIME_HELP),
    weights: Optional[str] = typer.Option(
        None, "--weights", "-w", help="Instead of --model: run directory, checkpoint or backbone.pt (--runtime torch)."
    ),
    head: str = typer.Option("backbone", "--head", help="With --weights: backbone or projector."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per encoder call."),
    index: str = typer.Option(
        "flat",
        "--index",
        help=INDEX_HELP,
    ),
    backend: Optional[str] = typer.Option(
        None,
        "--backend",
        help="faiss (the default; ivf and hnsw need it), or torch (exact flat search without FAISS; bf16's, and its "
        "default).",
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda."),
    shard_size: Optional[int] = typer.Option(
        None, "--shard-size", help="Input images per shard (default: 10000, pipeline.DEFAULT_SHARD_SIZE)."
    ),
    dtype: str = typer.Option("float32", "--dtype", help="Shard embeddings: float32 or float16."),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        help="Decoding worker processes (0: in this process; default: in this process when a batch decodes in under "
        "0.1 s, else the cores but one).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --output from its finished shards (a killed run)."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace an earlier embedding in --output (its own files; without it or --resume a directory that "
        "holds files is refused before any work).",
    ),
    skip_bad_images: SkipBadImages = False,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (images/s, ETA)."),
    engine: str = typer.Option("local", "--engine", help=ENGINE_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    actors: Optional[int] = typer.Option(None, "--actors", help=ACTORS_HELP),
):
    """Embed a dataset in shards (streamed, resumable) with an exported encoder or the torch one, and build an
    index."""
    from simsiam_kit.errors import check_number
    from simsiam_kit.retrieval.ray_engine import ENGINES

    if engine not in ENGINES:
        raise UserError(f"--engine must be {' or '.join(ENGINES)}, got '{engine}'")
    if engine == "local" and (ray_address or actors is not None):
        raise UserError("--ray-address / --actors apply to --engine ray")
    check_number("--batch-size", batch_size, 1, integer=True)
    check_writable("--output", output, directory=True)
    check_embed_output(output, resume, overwrite)
    precheck(data=[("--data", data)])
    from simsiam_kit.retrieval.pipeline import DEFAULT_SHARD_SIZE, embed_to_dir
    from simsiam_kit.retrieval.shards import DTYPES

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected {' or '.join(DTYPES)}")
    if backend is None:  # each kind's own backend (bf16: torch), else faiss
        from simsiam_kit.retrieval.index import KIND_BACKEND

        backend = KIND_BACKEND.get(index, "faiss")
    from simsiam_kit.export.runtime_choice import open_runtime

    embedder = open_runtime(
        model, runtime, weights, head, device, batch_size, log=typer.echo, onnxruntime_only=engine == "ray"
    )
    ray = None
    if engine == "ray":
        assert model is not None  # open_runtime refuses --engine ray without --model
        ray = ray_engine(model, data, device, batch_size, ray_address, actors)
    embed_to_dir(
        embedder,
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
        engine=ray,
        overwrite=overwrite,
    )


def check_embed_output(output, resume: bool = False, overwrite: bool = False) -> None:
    """Before any work (cheap, no model): an ``--output`` that already holds files is refused, naming it,
    unless ``resume`` (continue the run there: the shard writer checks it is the same run) or ``overwrite``
    (replace it: :data:`simsiam_kit.retrieval.pipeline.EMBED_FILES` are removed once the directory's lock is
    held, other files are kept)."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --output, --overwrite replaces it: give one of them")
    out = Path(output).expanduser()
    if resume or overwrite or not out.is_dir():
        return
    there = sorted(p.name for p in out.iterdir() if p.name != ".lock")
    if not there:
        return
    if (out / "manifest.json").exists():
        raise UserError(
            f"--output {out} already holds embedding shards ({out / 'manifest.json'}); --resume continues that "
            "run, --overwrite replaces it, or choose another output directory"
        )
    shown = ", ".join(there[:3]) + (", ..." if len(there) > 3 else "")
    raise UserError(
        f"--output {out} is not empty ({shown}); --overwrite replaces an earlier embedding there (embed's own "
        "files only), or choose another output directory"
    )


def ray_engine(model: Path, data: str, device: str, batch_size: int, ray_address: Optional[str], actors):
    """The ``engine`` of :func:`~simsiam_kit.retrieval.pipeline.embed_to_dir` for ``--engine ray``: a
    :class:`~simsiam_kit.retrieval.ray_engine.RayEngine` opening ``model`` in onnxruntime in each actor."""
    import functools

    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.ray_engine import RayEngine

    opener = functools.partial(OnnxEmbedder, Path(model).resolve(), device=device, batch_size=batch_size)
    return RayEngine(opener, data, address=ray_address, actors=actors, log=typer.echo)


@app.command("search")
@user_errors
def search_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="Directory written by `simsiam-kit embed`."),
    query: Path = typer.Option(..., "--query", "-q", help="An image file or a directory of images."),
    k: int = typer.Option(10, "--k", "-k", help="Neighbours per query."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Encoder (default: the one recorded by `embed`)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON results (default <index>/search.json)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    nprobe: Optional[int] = typer.Option(
        None, "--nprobe", help="IVF indexes: lists visited per query (default: the index's, set by `index build`)."
    ),
    ef: Optional[int] = typer.Option(None, "--ef", help="HNSW indexes: candidates kept while searching the graph."),
):
    """Nearest indexed images of each query, with cosine similarities: a table, JSON and a picture per query;
    says whether the index is approximate and the recall@10 its build measured."""
    if not (index / "embed.json").is_file():
        raise UserError(f"--index {index}: no embed.json there (a directory written by 'simsiam-kit embed')")
    for option, path in (("--query", query), ("--model", model)):
        if path is not None and not path.exists():
            raise UserError(f"{option} {path}: no such file or directory")
    out = output if output is not None else index / "search.json"
    check_writable("--output", out)  # before the index and the model load, not after the search
    from simsiam_kit.export.runtime_choice import open_for_index
    from simsiam_kit.retrieval.embed_search import format_search_table
    from simsiam_kit.retrieval.pictures import search_with_pictures

    report = search_with_pictures(
        index,
        query,
        lambda path: open_for_index(path, index, device=device, log=lambda s: typer.echo(s, err=True)),
        k=k,
        model=model,
        output=out,
        log=lambda s: typer.echo(s, err=True),
        nprobe=nprobe,
        ef=ef,
    )
    typer.echo(f"onnxruntime provider: {report['provider']}; {len(report['results'])} queries, k={report['k']}")
    typer.echo(report["index_description"])
    typer.echo(format_search_table(report))
    typer.echo(f"wrote {out}")
    for picture in report["pictures"]:
        typer.echo(f"wrote {picture}")
