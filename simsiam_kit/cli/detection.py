"""``simsiam-kit export detectron2`` and ``simsiam-kit eval detection`` (detection transfer)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from simsiam_kit.cli.common import user_errors
from simsiam_kit.cli.options import ArchNoLike, Weights, check_writable, new_app

eval_app = new_app()  # simsiam-kit eval detection


@eval_app.command("detection")
@user_errors
def eval_detection(
    weights: Weights,
    engine: str = typer.Option(
        "torchvision", "--engine", "-e", help="torchvision (runs anywhere) or detectron2 (the paper's protocol)."
    ),
    config: Optional[str] = typer.Option(
        None,
        "--config",
        "-c",
        help="Config name in configs/detection/ or a YAML path "
        "(default: torchvision_r50_fpn / d2_voc0712_R_50_C4_24k).",
    ),
    train_json: Optional[Path] = typer.Option(None, "--train-json", help="COCO instances JSON for training."),
    train_images: Optional[Path] = typer.Option(None, "--train-images", help="Image folder of --train-json."),
    val_json: Optional[Path] = typer.Option(None, "--val-json", help="COCO instances JSON for evaluation."),
    val_images: Optional[Path] = typer.Option(None, "--val-images", help="Image folder of --val-json."),
    voc_root: Optional[Path] = typer.Option(
        None, "--voc-root", help="Pascal VOC VOCdevkit directory (instead of COCO JSON)."
    ),
    voc_train: str = typer.Option(
        "2007/trainval,2012/trainval", "--voc-train", help="VOC training splits, YEAR/SPLIT[,YEAR/SPLIT]."
    ),
    voc_val: str = typer.Option("2007/test", "--voc-val", help="VOC evaluation splits."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Training iterations (LR steps scale with it)."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Output directory (default runs/detection-<engine>-<time>)."
    ),
    set_: Optional[List[str]] = typer.Option(
        None,
        "--set",
        "-s",
        help="Config override: solver.base_lr=0.01 (torchvision) or SOLVER.BASE_LR=0.01 (detectron2).",
    ),
    arch: ArchNoLike = None,
    num_gpus: int = typer.Option(
        1,
        "--num-gpus",
        help="detectron2 engine: processes (GPUs) per machine, at most the visible GPUs (1 on a CPU-only machine).",
    ),
    num_machines: int = typer.Option(
        1,
        "--num-machines",
        help="detectron2 engine: machines taking part (detectron2's launch; run the same command on each).",
    ),
    machine_rank: int = typer.Option(
        0, "--machine-rank", help="detectron2 engine: this machine's rank, 0..N-1 (machine 0 writes the results)."
    ),
    dist_url: str = typer.Option(
        "auto",
        "--dist-url",
        help="detectron2 engine: tcp://HOST:PORT of machine 0 "
        "(required with --num-machines > 1; 'auto' = a free local port).",
    ),
):
    """Fine-tune a detector on a backbone and report COCO AP (results.json, table, predictions PNG).

    --weights may also be a ready detectron2 .pkl (--engine detectron2).
    detectron2 loads .pkl weights with pickle, which can run code: simsiam-kit
    first reads the file with a restricted unpickler (numpy arrays and plain
    containers only), refuses anything else with one line, and hands
    detectron2 a copy written from what it accepted. Use .pkl files from
    sources you trust.
    """
    import time

    from simsiam_kit.errors import UserError, check_number
    from simsiam_kit.evaluation.detection.data import resolve_data
    from simsiam_kit.evaluation.detection.engines import ENGINES, DetectionRequest, Launch

    if engine not in ENGINES:
        raise UserError(f"--engine {engine!r}: expected {' or '.join(ENGINES)}")
    if iters is not None:
        check_number("--iters", iters, 1, integer=True)
    check_number("--num-gpus", num_gpus, 1, integer=True)
    check_number("--num-machines", num_machines, 1, integer=True)
    check_number("--machine-rank", machine_rank, 0, num_machines - 1, integer=True)
    launch = Launch(num_gpus, num_machines, machine_rank, dist_url)
    if not ENGINES[engine].launches and launch != Launch():
        raise UserError(
            "--num-gpus/--num-machines/--machine-rank/--dist-url launch detectron2's workers; the "
            f"{engine} engine runs one process (use --engine detectron2)"
        )
    out_dir = output or Path("runs") / f"detection-{engine}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_writable("--output", out_dir, directory=True)
    data = resolve_data(train_json, train_images, val_json, val_images, voc_root, voc_train, voc_val)
    request = DetectionRequest(
        weights, data, out_dir, config=config, iters=iters, overrides=set_, arch=arch, launch=launch
    )
    res = ENGINES[engine].run(request, typer.echo)
    if res:
        from simsiam_kit.evaluation.detection.metrics import format_results

        typer.echo("")
        typer.echo(format_results(res))
        typer.echo(f"results: {out_dir / 'results.json'}")
