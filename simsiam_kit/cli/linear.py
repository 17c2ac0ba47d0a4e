"""``simsiam-kit eval linear``: linear probe with the official protocol (evaluation/linear.py)."""

from __future__ import annotations

import typer

from simsiam_kit.cli.common import EVAL_REMEDIES, user_errors
from simsiam_kit.cli.options import (
    Arch,
    BatchSize,
    DataRoot,
    Device,
    Download,
    ImageSize,
    Like,
    Mean,
    Output,
    Overwrite,
    Precision,
    Seed,
    SkipBadImages,
    Std,
    Stem,
    TestData,
    TrainData,
    Weights,
    Workers,
    echo_eval_results,
    eval_inputs,
    new_app,
)
from simsiam_kit.config import DEFAULT_DATA_ROOT

app = new_app()


@app.command("linear")
@user_errors(remedies=EVAL_REMEDIES)
def linear(
    weights: Weights,
    train_data: TrainData,
    test_data: TestData,
    epochs: int = typer.Option(90, "--epochs", help="Training epochs (official ImageNet protocol: 90)."),
    cached_features: bool = typer.Option(
        False,
        "--cached-features",
        help="Extract features once (no augmentation) "
        "and train the head on them: a fast approximation of the protocol.",
    ),
    like: Like = None,
    output: Output = None,
    overwrite: Overwrite = False,
    batch_size: BatchSize = 256,
    lr: float = typer.Option(
        0.1, "--lr", help="Base learning rate; the rate used is lr x batch / 256, cosine-decayed."
    ),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (momentum 0.9) | lars (LARC around the same SGD)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Weight decay (protocol: 0)."),
    arch: Arch = None,
    stem: Stem = None,
    device: Device = "auto",
    precision: Precision = "auto",
    image_size: ImageSize = None,
    mean: Mean = None,
    std: Std = None,
    workers: Workers = 2,
    data_root: DataRoot = DEFAULT_DATA_ROOT,
    download: Download = False,
    skip_bad_images: SkipBadImages = False,
    seed: Seed = 0,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Per-epoch curves PNG."),
    lr_sweep: bool = typer.Option(
        False,
        "--lr-sweep",
        help="With --cached-features: train one head per base lr "
        "(1e-3 ... 30) x weight decay (0, 1e-4) in one pass, choose on held-out training "
        "images, report that head on the test set.",
    ),
):
    """Linear probe on a frozen backbone (official main_lincls.py protocol); writes results.json, head.pt, curves.
    The baseline of a run: --weights random --like RUN."""
    out, mean_v, std_v = eval_inputs(
        "linear",
        weights,
        like,
        train_data,
        test_data,
        output,
        overwrite,
        image_size,
        arch,
        mean,
        std,
        data_root,
        download,
    )
    from simsiam_kit.evaluation.linear import LinearSettings, results_table, run_linear_probe

    settings = LinearSettings(
        weights=weights,
        train_data=train_data,
        test_data=test_data,
        epochs=epochs,
        cached_features=cached_features,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        arch=arch,
        stem=stem,
        like=like,
        device=device,
        precision=precision,
        image_size=image_size,
        mean=mean_v,
        std=std_v,
        workers=workers,
        root=data_root,
        download=download,
        skip_bad_images=skip_bad_images,
        overwrite=overwrite,
        seed=seed,
        progress=progress,
        plots=plots,
        lr_sweep=lr_sweep,
    )
    results = run_linear_probe(settings, out, log=typer.echo)
    echo_eval_results("linear", results, results_table(results), out)
