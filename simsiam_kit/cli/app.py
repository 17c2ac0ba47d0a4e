"""The main ``simsiam-kit`` app: adds each command module's own Typer (no registration by name)."""

from __future__ import annotations

from simsiam_kit.cli import detection, embed_scale, knn, linear, onnx, pretrain
from simsiam_kit.cli import index as index_cli
from simsiam_kit.cli.options import new_app

app = new_app(
    help="SimSiam self-supervised pretraining, evaluation, detection transfer and export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eval_app = new_app(help="Evaluate pretrained backbones: linear probe, kNN, detection transfer.", no_args_is_help=True)
export_app = new_app(help="Export weights: ONNX encoders, Detectron2 checkpoints.", no_args_is_help=True)

app.add_typer(pretrain.app)  # simsiam-kit pretrain
eval_app.add_typer(knn.app)  # simsiam-kit eval knn
eval_app.add_typer(linear.app)  # simsiam-kit eval linear
eval_app.add_typer(detection.eval_app)  # simsiam-kit eval detection
export_app.add_typer(onnx.export_app)  # simsiam-kit export onnx
export_app.add_typer(detection.export_app)  # simsiam-kit export detectron2
app.add_typer(eval_app, name="eval")
app.add_typer(export_app, name="export")
app.add_typer(onnx.app)  # simsiam-kit embed, simsiam-kit search
app.add_typer(embed_scale.app)  # simsiam-kit embed (streaming, sharded; replaces onnx.app's)
app.add_typer(index_cli.app, name="index")  # simsiam-kit index build
app.add_typer(index_cli.search_app)  # simsiam-kit search (--nprobe/--ef; replaces onnx.app's)


def main() -> None:
    """The console entry point: choose the CPU thread count from the cores and the load before torch is loaded
    (OpenMP reads OMP_NUM_THREADS once; simsiam_kit.utils.device.choose_threads), then run the command."""
    from simsiam_kit.cli.common import err
    from simsiam_kit.errors import UserError
    from simsiam_kit.utils.device import apply_thread_choice

    try:
        apply_thread_choice()
    except UserError as e:
        err(str(e))
        raise SystemExit(2) from None
    app()
