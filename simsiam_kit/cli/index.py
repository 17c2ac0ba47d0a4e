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
        "ivfsq, ivfpq or opq_ivfpq (approximate).",
    ),
    max_index_memory: str = typer.Option(
        "4G", "--max-index-memory", help="Memory the index may take (e.g. 4G, 512M); larger goes on disk."
    ),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="IVF lists (default: autofaiss's rule)."),
    pq_m: Optional[int] = typer.Option(None, "--pq-m", help="PQ code bytes per vector (ivfpq, opq_ivfpq)."),
    hnsw_m: Optional[int] = typer.Option(None, "--hnsw-m", help="HNSW links per vector."),
    sq_bits: Optional[int] = typer.Option(
        None, "--sq-bits", help="Bits per dimension of the scalar-quantizer code (ivfsq: 8, 6 or 4; default 8)."
    ),
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
    from simsiam_kit.retrieval.index_build import build_index, check_options, shards_source

    check_options(index, max_index_memory, nlist, pq_m, hnsw_m, sq_bits)  # bad options before reading anything
    r = build_index(
        shards_source(embeddings, verify=not no_verify),
        output or embeddings,
        kind=index,
        max_index_memory=max_index_memory,
        nlist=nlist,
        pq_m=pq_m,
        hnsw_m=hnsw_m,
        sq_bits=sq_bits,
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
