"""``simsiam-kit pretrain``: SimSiam pretraining from a YAML config (simsiam_kit/pretrain.py does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from simsiam_kit.cli.common import PRETRAIN_REMEDIES, user_errors
from simsiam_kit.cli.options import Overrides, new_app, precheck

app = new_app()


@app.command("pretrain")
@user_errors(remedies=PRETRAIN_REMEDIES)
def pretrain(
    config: str = typer.Option("demo", "--config", "-c", help="Config name in configs/pretrain/ or a YAML path."),
    set_: Overrides = None,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run directory (default runs/<name>-<time>)."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --output (or the latest run of this config) from its last checkpoint; "
        "--set may change only optim.epochs, logging keys and data.workers (recorded in "
        "config.amendments.yaml; docs/reliability.md).",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace the run files of a non-empty --output (config, checkpoints, backbone, metrics, plots, "
        "results, eval); other files stay. Without it a non-empty directory is refused.",
    ),
):
    """SimSiam pretraining. With no arguments: the built-in demo (4,000 MNIST digits, 8 epochs), a few minutes
    on 2 idle CPU cores; on cores other processes keep busy it trains with fewer threads (it says so at the
    start) and takes longer (README: measured times, "CPU threads")."""
    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.errors import UserError

    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other (continue the run, or replace it)")
    if not resume:  # the config and its data paths are checked before torch is imported
        cfg = load_pretrain_config(config, set_)
        precheck(data=[("data.train", cfg.data.train)] + ([("data.val", cfg.data.val)] if cfg.data.val else []))
    else:
        output, cfg = resumed_run(config, output, set_)

    from simsiam_kit.pretrain import run_pretrain
    from simsiam_kit.utils import dist

    summary = run_pretrain(cfg, output, resume=resume, log=typer.echo, overwrite=overwrite)
    if dist.is_main() and summary:
        echo_summary(summary)
    dist.cleanup()


def resumed_run(config: str, output: Optional[Path], overrides: Overrides):
    """``--resume``: the run directory (``--output``, or the latest run of ``config`` under runs/) and its config
    (``config.yaml`` + amendments + ``--set``)."""
    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.engine.resume import find_latest_run, load_run_config
    from simsiam_kit.engine.run_dir import RunDir
    from simsiam_kit.errors import UserError

    if output is None:
        base = load_pretrain_config(config, None)
        output = find_latest_run(base.name)
        if output is None:
            raise UserError(
                f"--resume: no run of config '{base.name}' with a checkpoint under runs/; pass --output RUN_DIR"
            )
    if not RunDir(output).has_checkpoint():
        raise UserError(f"--resume: no checkpoint at {RunDir(output).checkpoint}")
    return output, load_run_config(output, overrides)


def echo_summary(summary: dict) -> None:
    """The lines printed when a run has finished (from its ``results/pretrain.json``)."""
    typer.echo("")
    typer.echo(
        f"finished: {summary['run_dir']}  ({summary['train_seconds']:.0f} s, "
        f"{summary['images_per_s'] or 0:.1f} images/s, {summary['precision']})"
    )
    typer.echo(
        f"  final loss {summary['final_loss']:.4f}, output std x sqrt(d) {summary['std_x_sqrt_d']:.3f} "
        "(healthy ~1, collapsed ~0)"
    )
    if summary.get("knn_top1") is not None:
        knn = summary["knn"]
        typer.echo(
            f"  kNN top-1 (k={knn['k']}, T={knn['temperature']:g}) on {knn['queries']}, "
            f"features {knn.get('precision', 'fp32')}:"
        )
        typer.echo(f"    SimSiam backbone      {summary['knn_top1']:6.2f} %  (epoch {summary['epochs']})")
        typer.echo(
            f"    random-init backbone  {summary['knn_top1_random_init']:6.2f} %  (epoch 0: this run's initial weights)"
        )
        typer.echo(f"  the same baseline in eval knn / eval linear: --weights random --like {summary['run_dir']}")
