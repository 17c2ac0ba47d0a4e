"""The main ``simsiam-kit`` app: adds each command module's own Typer (no registration by name)."""

from __future__ import annotations

import typer

from simsiam_kit.cli import detection, knn, linear, onnx, pretrain

app = typer.Typer(
    help="SimSiam self-supervised pretraining, evaluation, detection transfer and export.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Evaluate pretrained backbones: linear probe, kNN, detection transfer.",
                       no_args_is_help=True)
export_app = typer.Typer(help="Export weights: ONNX encoders, Detectron2 checkpoints.", no_args_is_help=True)

app.add_typer(pretrain.app)  # simsiam-kit pretrain
eval_app.add_typer(knn.app)  # simsiam-kit eval knn
eval_app.add_typer(linear.app)  # simsiam-kit eval linear
eval_app.add_typer(detection.eval_app)  # simsiam-kit eval detection
export_app.add_typer(onnx.export_app)  # simsiam-kit export onnx
export_app.add_typer(detection.export_app)  # simsiam-kit export detectron2
app.add_typer(eval_app, name="eval")
app.add_typer(export_app, name="export")
app.add_typer(onnx.app)  # simsiam-kit embed, simsiam-kit search


def main() -> None:
    app()
