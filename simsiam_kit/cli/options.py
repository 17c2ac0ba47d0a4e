"""Options shared by several commands, declared once (``Annotated`` types: a command writes
``weights: Weights`` and its default). Help texts and flag names live only here, and so do the cheap
checks a command runs before it imports torch (:func:`precheck`), so a wrong path or value is reported
at once instead of after seconds of imports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional, Sequence

import typer

from simsiam_kit.config import DEFAULT_DATA_ROOT, IMAGENET_MEAN
from simsiam_kit.errors import UserError


def new_app(**kw) -> typer.Typer:
    """A Typer app with plain help: no Rich markup, so help texts print as written ("[a:b]" stays) and flags
    show no value type."""
    return typer.Typer(rich_markup_mode=None, **kw)


Weights = Annotated[
    str,
    typer.Option(
        "--weights",
        "-w",
        help="Run directory, checkpoint, backbone.pt, torchvision ResNet state dict, or 'random' "
        "(a random-init baseline).",
    ),
]
Like = Annotated[
    Optional[str],
    typer.Option(
        "--like",
        metavar="RUN",
        help="With --weights random: take the architecture, stem, initial weights (the run's "
        "seed) and image size/normalisation of this run, so the baseline is the run "
        "before training. Default output RUN/eval/<kind>-random-init.",
    ),
]
KnnTrainData = Annotated[
    str,
    typer.Option(
        "--train-data", help="Labelled training set: the kNN bank (dataset spec, e.g. cifar10:train or PATH.npz)."
    ),
]
KnnTestData = Annotated[
    str,
    typer.Option("--test-data", help="Labelled test set: the queries, each scored by its neighbours (dataset spec)."),
]
TrainData = Annotated[
    str,
    typer.Option(
        "--train-data", help="Labelled training set the head learns on (dataset spec, e.g. cifar10:train or PATH.npz)."
    ),
]
TestData = Annotated[
    str, typer.Option("--test-data", help="Labelled test set the trained head is scored on (dataset spec).")
]
Arch = Annotated[
    Optional[str],
    typer.Option(
        "--arch",
        help="Backbone architecture (for --weights random without --like; checked against the weights otherwise).",
    ),
]
ArchNoLike = Annotated[
    Optional[str],
    typer.Option("--arch", help="Backbone architecture (for --weights random; checked against the weights otherwise)."),
]
Stem = Annotated[
    Optional[str], typer.Option("--stem", help="cifar or imagenet (for --weights random: default imagenet).")
]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
Precision = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Feature extraction: auto (= fp32, as the pretraining kNN monitor, so the numbers match) | "
        "fp32 | bf16 | fp16 (faster on GPUs and bf16 CPUs, last digits differ).",
    ),
]
ImageSize = Annotated[
    Optional[int],
    typer.Option(
        "--image-size",
        help="Image size (default: the weights' metadata, else the run's config, else in-memory images "
        "at their own size, files at 32 px for the CIFAR stem and 224 px for the ImageNet stem).",
    ),
]
Mean = Annotated[
    Optional[str],
    typer.Option(
        "--mean",
        help=f"Normalisation mean, e.g. 0.4914,0.4822,0.4465 (default: as --image-size; ImageNet "
        f"{','.join(map(str, IMAGENET_MEAN))}).",
    ),
]
Std = Annotated[Optional[str], typer.Option("--std", help="Normalisation std (default: as --mean).")]
Workers = Annotated[int, typer.Option("--workers", help="DataLoader workers for image files.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")]
Output = Annotated[
    Optional[Path],
    typer.Option(
        "--output",
        "-o",
        help="Output directory (default RUN/eval/<kind> for a run directory, "
        "RUN/eval/<kind>-random-init with --like RUN, else runs/eval-<kind>-<time>).",
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace the results of an earlier evaluation in the output directory (without it they "
        "are kept and the command stops).",
    ),
]
DataRoot = Annotated[
    str, typer.Option("--data-root", help="Where torchvision datasets (cifar10, cifar100, stl10) live.")
]
Download = Annotated[
    bool, typer.Option("--download/--no-download", help="Download torchvision datasets into --data-root if missing.")
]
SkipBadImages = Annotated[
    bool, typer.Option("--skip-bad-images", help="Skip unreadable image files (and count them) instead of stopping.")
]
Seed = Annotated[
    int,
    typer.Option(
        "--seed",
        help="Seed of the head's initialisation, the data order and the crops "
        "(and of --weights random without --like).",
    ),
]
Overrides = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: --set optim.epochs=10")
]
DATA_ROOT_DEFAULT = DEFAULT_DATA_ROOT


def parse_floats(text: Optional[str], option: str) -> Optional[tuple]:
    """``--mean``/``--std``: three comma-separated numbers (std positive), or None when not given."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(
            f"{option}: expected 3 comma-separated numbers such as 0.485,0.456,0.406, got '{text}'"
        ) from None
    if len(values) != 3:
        raise UserError(f"{option}: expected 3 comma-separated numbers (R,G,B), got {len(values)} in '{text}'")
    if option == "--std" and any(not v > 0 for v in values):
        raise UserError(f"{option}: values must be positive, got '{text}'")
    return values


def precheck(
    weights: Optional[str] = None,
    like: Optional[str] = None,
    data: Sequence[tuple[str, str]] = (),
    output: Optional[Path] = None,
    overwrite: bool = False,
    image_size: Optional[int] = None,
    arch: Optional[str] = "",
    data_root: Optional[str] = None,
    download: bool = True,
) -> None:
    """Checks that need no torch: the weights spec (:func:`simsiam_kit.weights.resolve_weights`), the dataset
    specs (``(option, spec)`` pairs; torchvision sets looked for under ``data_root`` unless ``download``), an
    output directory that can be created and holds no earlier results, the image size. ``arch``: the
    command's --arch, for commands that offer --like (random weights need one or the other)."""
    from simsiam_kit.data.datasets import check_spec

    if image_size is not None:
        from simsiam_kit.image_settings import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

        if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
            raise UserError(f"--image-size {image_size}: expected {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels")
    from simsiam_kit.weights import is_random  # light: no torch

    if like is not None and weights is not None and not is_random(weights):
        raise UserError(f"--like applies to --weights random only (--weights {weights} has settings of its own)")
    if weights is not None:
        from simsiam_kit.weights import resolve_weights

        if is_random(weights) and like is None and arch is None:
            raise UserError(
                "--weights random needs --like RUN (that run's own random init and settings, the "
                "baseline to compare it with) or --arch (for example --arch resnet18)"
            )
        resolve_weights(weights, like)
    for option, spec in data:
        try:
            check_spec(spec, data_root, download)
        except UserError as e:
            err = UserError(f"{option} {spec}: {e}")
            err.remedy = getattr(e, "remedy", None)  # the command's words for what to do about it
            raise err from None
    if output is not None:
        from simsiam_kit.evaluation.common import check_output

        check_writable("--output", output, directory=True)
        check_output(output, overwrite)


def check_writable(option: str, path: Path, directory: bool = False) -> None:
    """Before any work: ``path`` (a file, or a ``directory``, the command will write) can be created there. An
    existing path of the other kind, or a nearest existing ancestor that is a file or not writable, is one
    line naming ``option`` (cheap: no torch)."""
    import os

    p = Path(path).expanduser()
    if p.exists():
        if directory and not p.is_dir():
            raise UserError(f"{option} {path}: exists and is not a directory")
        if not directory and p.is_dir():
            raise UserError(f"{option} {path}: is a directory; give a file name such as {p / 'model.onnx'}")
        return
    parent = next((a for a in p.parents if a.exists()), None)
    if parent is None:
        return
    if not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: cannot create it in {parent} (permission denied)")


def eval_inputs(
    kind: str,
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
    data_root: Optional[str] = None,
    download: bool = True,
):
    """What ``eval knn`` and ``eval linear`` check and resolve before torch loads: the paths and option
    values (:func:`precheck`; the data before the output, so a missing dataset is never hidden behind earlier
    results), the output directory (default by :func:`default_output`) and ``--mean``/``--std`` parsed;
    returns ``(output, mean, std)``."""
    from simsiam_kit.evaluation.common import default_output

    mean_v, std_v = parse_floats(mean, "--mean"), parse_floats(std, "--std")
    data = [("--train-data", train_data), ("--test-data", test_data)]
    precheck(weights, like, data, None, overwrite, image_size, arch, data_root, download)
    out = output or default_output(weights, kind, like)
    precheck(output=out, overwrite=overwrite)
    return out, mean_v, std_v


def echo_eval_results(kind: str, results: dict, table: str, output) -> None:
    """An evaluation's table, the baseline rows when a random-init baseline or its run is at hand, and where
    results.json is."""
    from simsiam_kit.evaluation.common import baseline_table

    typer.echo(table)
    baseline = baseline_table(kind, results)
    if baseline:
        typer.echo(baseline)
    typer.echo(f"results: {Path(output) / 'results.json'}")
