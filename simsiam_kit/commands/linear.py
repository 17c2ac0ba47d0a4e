"""``simsiam-kit eval linear``: linear probe with the official protocol (evaluation/linear.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app, eval_app, export_app, user_errors) -> None:
    @eval_app.command("linear")
    @user_errors
    def linear(
        weights: str = typer.Option(..., "--weights", "-w", help="Run directory, checkpoint, backbone.pt, or 'random' (with --arch)."),
        train_data: str = typer.Option(..., "--train-data", help="Labelled training set (dataset spec)."),
        test_data: str = typer.Option(..., "--test-data", help="Labelled test set (dataset spec)."),
        epochs: int = typer.Option(90, "--epochs", help="Training epochs (official ImageNet protocol: 90)."),
        cached_features: bool = typer.Option(False, "--cached-features", help="Extract features once (no augmentation) and train the head on them: a fast approximation of the protocol."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory (default RUN/eval/linear for a run directory, else runs/eval-linear-<time>)."),
        batch_size: int = typer.Option(256, "--batch-size", "-b", help="Batch size (official ImageNet: 4096 with --optimizer lars)."),
        lr: float = typer.Option(0.1, "--lr", help="Base learning rate; the rate used is lr x batch / 256, cosine-decayed."),
        optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (momentum 0.9) | lars (LARC around the same SGD)."),
        weight_decay: float = typer.Option(0.0, "--weight-decay", help="Weight decay (protocol: 0)."),
        arch: Optional[str] = typer.Option(None, "--arch", help="Backbone architecture (needed with --weights random)."),
        stem: Optional[str] = typer.Option(None, "--stem", help="cifar or imagenet (for --weights random: default imagenet)."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
        precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 | fp16 (backbone forward)."),
        image_size: Optional[int] = typer.Option(None, "--image-size", help="Override the image size stored with the weights."),
        mean: Optional[str] = typer.Option(None, "--mean", help="Override normalisation mean, e.g. 0.4914,0.4822,0.4465"),
        std: Optional[str] = typer.Option(None, "--std", help="Override normalisation std."),
        workers: int = typer.Option(2, "--workers", help="DataLoader workers for image files."),
        seed: int = typer.Option(0, "--seed"),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Per-epoch curves PNG."),
    ):
        """Linear probe on a frozen backbone (official main_lincls.py protocol); writes results.json, head.pt, curves."""
        from evaluation.common import default_output, parse_floats
        from evaluation.linear import LinearSettings, results_table, run_linear_probe

        settings = LinearSettings(
            weights=weights, train_data=train_data, test_data=test_data, epochs=epochs,
            cached_features=cached_features, batch_size=batch_size, lr=lr, optimizer=optimizer,
            weight_decay=weight_decay, arch=arch, stem=stem, device=device, precision=precision,
            image_size=image_size, mean=parse_floats(mean, "mean"), std=parse_floats(std, "std"), workers=workers,
            seed=seed, progress=progress, plots=plots,
        )
        out = output or default_output(weights, "linear")
        results = run_linear_probe(settings, out, log=typer.echo)
        typer.echo(results_table(results))
        typer.echo(f"results: {Path(out) / 'results.json'}")
