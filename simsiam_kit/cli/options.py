"""Options shared by several commands, declared once (``Annotated`` types: a command writes
``weights: Weights`` and its default). Help texts and flag names live only here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from simsiam_kit.config import DEFAULT_DATA_ROOT

Weights = Annotated[str, typer.Option(
    "--weights", "-w", help="Run directory, checkpoint, backbone.pt, or 'random' (with --arch).")]
TrainData = Annotated[str, typer.Option("--train-data", help="Labelled training set / kNN bank (dataset spec, e.g. cifar10:train or PATH.npz).")]
TestData = Annotated[str, typer.Option("--test-data", help="Labelled test set / queries (dataset spec).")]
Arch = Annotated[Optional[str], typer.Option("--arch", help="Backbone architecture (needed with --weights random).")]
Stem = Annotated[Optional[str], typer.Option("--stem", help="cifar or imagenet (for --weights random: default imagenet).")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
Precision = Annotated[str, typer.Option("--precision", help="auto | fp32 | bf16 | fp16 (backbone forward).")]
ImageSize = Annotated[Optional[int], typer.Option("--image-size", help="Override the image size stored with the weights.")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="Override normalisation mean, e.g. 0.4914,0.4822,0.4465")]
Std = Annotated[Optional[str], typer.Option("--std", help="Override normalisation std.")]
Workers = Annotated[int, typer.Option("--workers", help="DataLoader workers for image files.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")]
Output = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Output directory (default RUN/eval/<kind> for a run directory, else runs/eval-<kind>-<time>).")]
DataRoot = Annotated[str, typer.Option("--data-root", help="Where torchvision datasets (cifar10, cifar100, stl10) live.")]
Download = Annotated[bool, typer.Option("--download/--no-download", help="Download torchvision datasets into --data-root if missing.")]
Overrides = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: --set optim.epochs=10")]

DATA_ROOT_DEFAULT = DEFAULT_DATA_ROOT
