"""The main ``simsiam-kit`` app: adds each command module's own Typer (no registration by name)."""

from __future__ import annotations

import typer

from simsiam_kit.cli import detection, embed, export, knn, linear, pretrain, serve
from simsiam_kit.cli import index as index_cli
from simsiam_kit.cli.options import new_app

app = new_app(
    help="SimSiam self-supervised pretraining, evaluation, detection transfer and export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from simsiam_kit import __version__

        typer.echo(f"simsiam-kit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """SimSiam self-supervised pretraining, evaluation, detection transfer and export."""


eval_app = new_app(help="Evaluate pretrained backbones: linear probe, kNN, detection transfer.", no_args_is_help=True)

app.add_typer(pretrain.app)  # simsiam-kit pretrain
eval_app.add_typer(knn.app)  # simsiam-kit eval knn
eval_app.add_typer(linear.app)  # simsiam-kit eval linear
eval_app.add_typer(detection.eval_app)  # simsiam-kit eval detection
app.add_typer(eval_app, name="eval")
app.add_typer(export.app, name="export")  # simsiam-kit export onnx, simsiam-kit export detectron2
app.add_typer(embed.app)  # simsiam-kit embed, simsiam-kit search
app.add_typer(index_cli.app, name="index")  # simsiam-kit index build
app.add_typer(serve.app)  # simsiam-kit serve


def main() -> None:
    """The console entry point: choose the CPU thread count from the idle cores before torch is loaded (OpenMP
    reads OMP_NUM_THREADS once; simsiam_kit.utils.device.choose_threads), then run the command. Help (no
    arguments, ``--help``/``-h``) computes nothing, so it skips the 0.5 s idle-time sample and stays instant."""
    import sys

    from simsiam_kit.cli.common import err
    from simsiam_kit.errors import UserError
    from simsiam_kit.utils.device import apply_thread_choice

    argv = sys.argv[1:]
    try:
        if argv and not {"--help", "-h", "--version"} & set(argv):
            apply_thread_choice()
    except UserError as e:
        err(str(e))
        raise SystemExit(2) from None
    app()
