"""``simsiam-kit index build``: a FAISS index from the embedding shards of ``embed``
(simsiam_kit/retrieval/index_build.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from simsiam_kit.cli.common import user_errors
from simsiam_kit.cli.options import new_app

app = new_app(help="Build nearest-neighbour indexes from embedding shards.", no_args_is_help=True)


@app.command("build")
@user_errors
def build_cmd(
    embeddings: Path = typer.Option(
        ..., "--embeddings", "-e", help="Directory written by `simsiam-kit embed` (manifest.json + shards/)."
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Where to write the index (default: the embeddings directory, for `search`)."
    ),
    index: str = typer.Option(
        "auto",
        "--index",
        help="auto (autofaiss's rule from the vector count and --max-index-memory), flat (exact), hnsw, ivf, "
        "ivfpq or opq_ivfpq (approximate).",
    ),
    max_index_memory: str = typer.Option(
        "4G", "--max-index-memory", help="Memory the index may take (e.g. 4G, 512M); larger goes on disk."
    ),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="IVF lists (default: autofaiss's rule)."),
    pq_m: Optional[int] = typer.Option(None, "--pq-m", help="PQ code bytes per vector (ivfpq, opq_ivfpq)."),
    hnsw_m: Optional[int] = typer.Option(None, "--hnsw-m", help="HNSW links per vector."),
    on_disk: Optional[bool] = typer.Option(
        None,
        "--on-disk/--in-memory",
        help="Inverted lists in index.ivfdata, memory-mapped (default: when the index exceeds --max-index-memory).",
    ),
    block_rows: int = typer.Option(1_000_000, "--block-rows", help="Vectors per block of an on-disk build."),
    queries: int = typer.Option(1_000, "--queries", help="Held-out vectors the recall@10 is measured on."),
    target_recall: float = typer.Option(
        0.9, "--target-recall", help="The smallest nprobe / ef reaching this recall@10 becomes the default."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample and of k-means."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the sha256 check of each shard (sizes still)."),
):
    """Build a FAISS index from embedding shards in bounded memory and measure its recall@10 against exact search."""
    from simsiam_kit.errors import UserError

    if not embeddings.is_dir():
        raise UserError(f"--embeddings {embeddings}: no such directory (a directory written by `simsiam-kit embed`)")
    if block_rows < 1:
        raise UserError(f"--block-rows must be >= 1 (got {block_rows})")
    from simsiam_kit.retrieval.index_build import build_index, parse_memory, shards_source

    parse_memory(max_index_memory)  # a bad size before reading anything
    r = build_index(
        shards_source(embeddings, verify=not no_verify),
        output or embeddings,
        kind=index,
        max_index_memory=max_index_memory,
        nlist=nlist,
        pq_m=pq_m,
        hnsw_m=hnsw_m,
        on_disk=on_disk,
        queries=queries,
        target_recall=target_recall,
        block_rows=block_rows,
        seed=seed,
        log=typer.echo,
    )
    m = r.meta
    sweep = " ".join(
        f"{'nprobe' if 'nprobe' in s else 'ef'}={s.get('nprobe', s.get('ef'))}:{s['recall_at_10']:.3f}"
        for s in m["recall_sweep"]
    )
    if sweep:
        typer.echo(f"recall@10 sweep on {m['recall_queries']} held-out vectors: {sweep}")
    typer.echo(f"wrote {r.output / 'index.json'}")


# ------------------------------------------------------------------------------- embed --engine (shared wiring)
ENGINE_HELP = (
    "local (this process, decoding in DataLoader workers) or ray (Ray Data: an actor pool, one encoder "
    "session per actor; pip install -e '.[scale]')."
)
RAY_ADDRESS_HELP = "With --engine ray: join this Ray cluster (default: $RAY_ADDRESS, else start a local runtime)."
ACTORS_HELP = "With --engine ray: actors in the pool (default: one per CPU of the cluster)."


def embed_engine(
    engine: str,
    model: Path,
    data: str,
    device: str = "auto",
    batch_size: int = 64,
    ray_address: Optional[str] = None,
    actors: Optional[int] = None,
):
    """The ``engine`` argument of ``embed_dataset_to_dir`` / ``pipeline.embed_to_dir`` for ``embed --engine``:
    None for ``local``, a :class:`~simsiam_kit.retrieval.ray_engine.RayEngine` opening ``model`` with the
    command's device and batch size in each actor for ``ray``; a :class:`UserError` for anything else, or
    for Ray options without ``--engine ray``."""
    import functools

    from simsiam_kit.errors import UserError

    if engine not in ("local", "ray"):
        raise UserError(f"--engine must be local or ray, got '{engine}'")
    if engine == "local":
        if ray_address or actors is not None:
            raise UserError("--ray-address / --actors apply to --engine ray")
        return None
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.retrieval.ray_engine import RayEngine

    opener = functools.partial(OnnxEmbedder, Path(model).resolve(), device=device, batch_size=batch_size)
    return RayEngine(opener, data, address=ray_address, actors=actors, log=typer.echo)


# ------------------------------------------------------------------------------- search with the index's knobs
search_app = new_app()  # simsiam-kit search (registered after cli/onnx.py's app, whose search it replaces)


@search_app.command("search")
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
    """Nearest indexed images of each query, with cosine similarities: a table, and JSON; says whether the index
    is approximate and the recall@10 its build measured."""
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
        nprobe=nprobe,
        ef=ef,
    )
    typer.echo(f"onnxruntime provider: {report['provider']}; {len(report['results'])} queries, k={report['k']}")
    typer.echo(report["index_description"])
    typer.echo(format_search_table(report))
    typer.echo(f"wrote {out}")
