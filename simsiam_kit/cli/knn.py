"""``simsiam-kit eval knn``: weighted kNN classification and retrieval metrics (evaluation/knn.py)."""

from __future__ import annotations

from typing import List, Optional

import typer

from simsiam_kit.cli.common import EVAL_REMEDIES, user_errors
from simsiam_kit.cli.options import (
    Arch,
    BatchSize,
    DataRoot,
    Device,
    Download,
    ImageSize,
    KnnTestData,
    KnnTrainData,
    Like,
    Mean,
    Output,
    Overwrite,
    Precision,
    SkipBadImages,
    Std,
    Stem,
    Weights,
    Workers,
    echo_eval_results,
    eval_inputs,
    new_app,
)
from simsiam_kit.config import DEFAULT_DATA_ROOT, DEFAULT_FEATURE_BATCH

app = new_app()  # simsiam-kit eval knn


@app.command("knn")
@user_errors(remedies=EVAL_REMEDIES)
def knn(
    weights: Weights,
    train_data: KnnTrainData,
    test_data: KnnTestData,
    k: Optional[List[int]] = typer.Option(
        None,
        "--k",
        help="Neighbours; repeat for several from one search (--k 20 --k 200); the first is the headline. "
        "Default: 200, 10, 20, 100 (every peer's protocol).",
    ),
    temperature: Optional[List[float]] = typer.Option(
        None,
        "--temperature",
        "-t",
        help="Vote weight exp(sim / T); repeatable, the first is the headline. Default: 0.1, 0.07.",
    ),
    like: Like = None,
    output: Output = None,
    overwrite: Overwrite = False,
    arch: Arch = None,
    stem: Stem = None,
    backend: str = typer.Option(
        "auto", "--backend", help="auto | faiss | torch (see docs/evaluation.md for the auto rule)."
    ),
    index: str = typer.Option(
        "flat",
        "--index",
        help="flat (exact, default) | bf16 (approximate: bf16 similarities, the cut re-scored in fp32; torch) | "
        "ivf | hnsw (approximate, faiss) | auto (bf16 where it is faster here and finds 0.99 of the exact "
        "neighbours on 256 queries, else flat). Approximate searches report their recall against the exact one on "
        "500 queries.",
    ),
    rerank: Optional[int] = typer.Option(
        None,
        "--rerank",
        help="--index bf16 / auto: the 2 x N candidates around the k-th place are re-scored in fp32 (default 16; "
        "N >= k re-scores all k + N).",
    ),
    batch_size: BatchSize = DEFAULT_FEATURE_BATCH,
    device: Device = "auto",
    precision: Precision = "auto",
    image_size: ImageSize = None,
    mean: Mean = None,
    std: Std = None,
    workers: Workers = 2,
    data_root: DataRoot = DEFAULT_DATA_ROOT,
    download: Download = False,
    skip_bad_images: SkipBadImages = False,
    save_index: bool = typer.Option(False, "--save-index", help="Also write the search index under OUTPUT/index."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Confusion matrix and neighbour grid PNGs."),
):
    """Weighted kNN, every peer's protocol from one search (k 200/10/20/100 x T 0.1/0.07; headline k=200 T=0.1),
    plus recall@1/5/10 and mAP@R. The baseline of a run: --weights random --like RUN."""
    out, mean_v, std_v = eval_inputs(
        "knn", weights, like, train_data, test_data, output, overwrite, image_size, arch, mean, std, data_root, download
    )
    from simsiam_kit.evaluation.knn import KNNSettings, results_table, run_knn_eval

    settings = KNNSettings(
        weights=weights,
        train_data=train_data,
        test_data=test_data,
        ks=tuple(k) if k else None,
        temperatures=tuple(temperature) if temperature else None,
        arch=arch,
        stem=stem,
        like=like,
        backend=backend,
        index=index,
        rerank=rerank,
        batch_size=batch_size,
        device=device,
        precision=precision,
        image_size=image_size,
        mean=mean_v,
        std=std_v,
        workers=workers,
        plots=plots,
        save_index=save_index,
        root=data_root,
        download=download,
        skip_bad_images=skip_bad_images,
        overwrite=overwrite,
    )
    results = run_knn_eval(settings, out, log=typer.echo)
    echo_eval_results("knn", results, results_table(results), out)
