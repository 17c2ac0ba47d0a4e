"""The main ``simsiam-kit`` app: adds each command module's own Typer (no registration by name)."""

from __future__ import annotations

import typer

from simsiam_kit.cli import detection, linear, pretrain
from simsiam_kit.cli.common import user_errors

app = typer.Typer(
    help="SimSiam self-supervised pretraining, evaluation, detection transfer and export.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Evaluate pretrained backbones: linear probe, kNN, detection transfer.",
                       no_args_is_help=True)
export_app = typer.Typer(help="Export weights: ONNX encoders, Detectron2 checkpoints.", no_args_is_help=True)

app.add_typer(pretrain.app)
eval_app.add_typer(linear.app)
eval_app.add_typer(detection.eval_app)
export_app.add_typer(detection.export_app)

# TODO(issue 10): knn and onnx move to simsiam_kit/cli/ like the others once the retrieval refactor lands
from simsiam_kit.commands import knn as _knn, onnx as _onnx  # noqa: E402

for _m in (_knn, _onnx):
    _m.register(app, eval_app, export_app, user_errors)

app.add_typer(eval_app, name="eval")
app.add_typer(export_app, name="export")


def main() -> None:
    app()
