"""``simsiam-kit`` command line. Thin: parse, load config, call one library function, print.

Heavy and optional imports (torch models, faiss, onnxruntime, detectron2, matplotlib) happen inside
the commands, so ``simsiam-kit --help`` is instant. User errors print one line and exit with code 2.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    help="SimSiam self-supervised pretraining, evaluation, detection transfer and export.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Evaluate pretrained backbones: linear probe, kNN, detection transfer.",
                       no_args_is_help=True)
export_app = typer.Typer(help="Export weights: ONNX encoders, Detectron2 checkpoints.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
app.add_typer(export_app, name="export")

EXIT_USER_ERROR = 2


def err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


def user_errors(fn):
    """Turn :class:`UserError` (and Ctrl-C) into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from simsiam_kit.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err(str(e))
            raise typer.Exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(130)

    return wrapper


@app.command()
@user_errors
def pretrain(
    config: str = typer.Option("demo", "--config", "-c", help="Config name in configs/pretrain/ or a YAML path."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a config key: --set optim.epochs=10"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run directory (default runs/<name>-<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output (or the latest run of this config) from its last checkpoint."),
):
    """SimSiam pretraining. With no arguments: the built-in demo (MNIST digits, about 4 minutes on 2 CPU cores)."""
    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.errors import UserError
    from simsiam_kit.pretrain import find_latest_run, load_run_config, run_pretrain
    from simsiam_kit.utils import dist

    if resume:
        if output is None:
            base = load_pretrain_config(config, None)
            output = find_latest_run(base.name)
            if output is None:
                raise UserError(f"--resume: no run of config '{base.name}' with a checkpoint under runs/; pass --output RUN_DIR")
        if not (output / "checkpoints" / "last.pt").is_file():
            raise UserError(f"--resume: no checkpoint at {output / 'checkpoints' / 'last.pt'}")
        cfg = load_run_config(output, set_)
    else:
        cfg = load_pretrain_config(config, set_)
    summary = run_pretrain(cfg, output, resume=resume, log=typer.echo)
    if dist.is_main() and summary:
        typer.echo("")
        typer.echo(f"finished: {summary['run_dir']}  ({summary['train_seconds']:.0f} s, "
                   f"{summary['images_per_s'] or 0:.1f} images/s, {summary['precision']})")
        typer.echo(f"  final loss {summary['final_loss']:.4f}, output std x sqrt(d) {summary['std_x_sqrt_d']:.3f} (healthy ~1, collapsed ~0)")
        if summary.get("knn_top1") is not None:
            k = summary["knn"]["k"]
            typer.echo(f"  kNN top-1 (k={k}) on {summary['knn']['queries']}:")
            typer.echo(f"    SimSiam backbone      {summary['knn_top1']:6.2f} %")
            typer.echo(f"    random-init backbone  {summary['knn_top1_random_init']:6.2f} %")
    dist.cleanup()


def _register_plugins() -> None:
    from simsiam_kit.commands import register_all

    register_all(app, eval_app, export_app, user_errors)


_register_plugins()


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
