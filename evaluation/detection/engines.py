"""The detection engines behind one signature, looked up in one table.

``ENGINES[name](request, log)`` fine-tunes a detector on ``request.weights`` and returns
``results.json``'s content (None on a detectron2 machine other than machine 0, which writes the
results). Each engine module is imported only when its entry runs, so the table costs nothing to
import and a missing detectron2 fails with its own one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from simsiam_kit.errors import UserError
from simsiam_kit.evaluation.detection.data import DetectionData


@dataclass(frozen=True)
class Launch:
    """detectron2's launch: processes per machine, machines, this machine's rank, machine 0's URL."""

    num_gpus: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"


@dataclass(frozen=True)
class DetectionRequest:
    """What every engine takes: config name or path (None = the engine's default), weights spec,
    data, output directory, iteration override, ``--set`` overrides, architecture for random init,
    and the launch (only detectron2 launches several processes)."""

    weights: str
    data: DetectionData
    out_dir: Path
    config: Optional[str] = None
    iters: Optional[int] = None
    overrides: Optional[Sequence[str]] = None
    arch: Optional[str] = None
    launch: Launch = Launch()


@dataclass(frozen=True)
class Engine:
    name: str
    default_config: str
    run: Callable[[DetectionRequest, Callable[[str], None]], Optional[dict]]
    launches: bool  # True when the engine honours ``Launch`` (several processes / machines)


def _torchvision(req: DetectionRequest, log: Callable[[str], None]) -> Optional[dict]:
    from simsiam_kit.evaluation.detection.torchvision_engine import load_detection_config, run_torchvision_detection

    cfg = load_detection_config(req.config or ENGINES["torchvision"].default_config, req.overrides)
    return run_torchvision_detection(cfg, req.weights, req.data, req.out_dir, iters=req.iters, arch=req.arch, log=log)


def _detectron2(req: DetectionRequest, log: Callable[[str], None]) -> Optional[dict]:
    from simsiam_kit.evaluation.detection.detectron2_engine import run_detectron2_detection

    return run_detectron2_detection(
        req.config or ENGINES["detectron2"].default_config,
        req.weights,
        req.data,
        req.out_dir,
        iters=req.iters,
        overrides=req.overrides,
        num_gpus=req.launch.num_gpus,
        arch=req.arch,
        log=log,
        num_machines=req.launch.num_machines,
        machine_rank=req.launch.machine_rank,
        dist_url=req.launch.dist_url,
    )


ENGINES: dict[str, Engine] = {
    "torchvision": Engine("torchvision", "torchvision_r50_fpn", _torchvision, launches=False),
    "detectron2": Engine("detectron2", "d2_voc0712_R_50_C4_24k", _detectron2, launches=True),
}


def get_engine(name: str) -> Engine:
    """The engine ``name``; an unknown name raises with the available ones."""
    if name not in ENGINES:
        raise UserError(f"unknown detection engine {name!r}: expected {' or '.join(ENGINES)}")
    return ENGINES[name]
