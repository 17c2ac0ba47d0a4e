"""``simsiam-kit eval knn``: weighted kNN classification and retrieval metrics (evaluation/knn.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app, eval_app, export_app, user_errors) -> None:
    @eval_app.command("knn")
    @user_errors
    def knn(
        weights: str = typer.Option(..., "--weights", "-w", help="Run directory, checkpoint, backbone.pt, or 'random' (with --arch)."),
        train_data: str = typer.Option(..., "--train-data", help="Labelled bank (dataset spec, e.g. cifar10:train or PATH.npz)."),
        test_data: str = typer.Option(..., "--test-data", help="Labelled queries (dataset spec)."),
        k: Optional[List[int]] = typer.Option(None, "--k", help="Neighbours; repeat for several k from one search (--k 20 --k 200). Default 200."),
        temperature: float = typer.Option(0.1, "--temperature", "-t", help="Vote weight exp(sim / T)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory (default RUN/eval/knn for a run directory, else runs/eval-knn-<time>)."),
        arch: Optional[str] = typer.Option(None, "--arch", help="Backbone architecture (needed with --weights random)."),
        stem: Optional[str] = typer.Option(None, "--stem", help="cifar or imagenet (for --weights random: default imagenet)."),
        backend: str = typer.Option("auto", "--backend", help="auto | faiss | torch (see docs/evaluation.md for the auto rule)."),
        index: str = typer.Option("flat", "--index", help="flat (exact) | ivf | hnsw (approximate, faiss)."),
        batch_size: int = typer.Option(256, "--batch-size", help="Feature extraction batch size."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
        precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 | fp16 (feature extraction)."),
        image_size: Optional[int] = typer.Option(None, "--image-size", help="Override the image size stored with the weights."),
        mean: Optional[str] = typer.Option(None, "--mean", help="Override normalisation mean, e.g. 0.4914,0.4822,0.4465"),
        std: Optional[str] = typer.Option(None, "--std", help="Override normalisation std."),
        workers: int = typer.Option(2, "--workers", help="DataLoader workers for image files."),
        save_index: bool = typer.Option(False, "--save-index", help="Also write the search index under OUTPUT/index."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Confusion matrix and neighbour grid PNGs."),
    ):
        """Weighted kNN (InstDisc/DINO protocol, k=200 T=0.1) plus recall@1/5/10 and mAP@R from one search."""
        from evaluation.common import default_output, parse_floats
        from evaluation.knn import KNNSettings, results_table, run_knn_eval

        settings = KNNSettings(
            weights=weights, train_data=train_data, test_data=test_data, ks=tuple(k or [200]),
            temperature=temperature, arch=arch, stem=stem, backend=backend, index=index, batch_size=batch_size,
            device=device, precision=precision, image_size=image_size, mean=parse_floats(mean, "mean"),
            std=parse_floats(std, "std"), workers=workers, plots=plots, save_index=save_index,
        )
        out = output or default_output(weights, "knn")
        results = run_knn_eval(settings, out, log=typer.echo)
        typer.echo(results_table(results))
        typer.echo(f"results: {Path(out) / 'results.json'}")
