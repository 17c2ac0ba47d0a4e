"""The rules of a run directory across runs: which directory a run may use, what ``--resume`` continues
from, which config changes it accepts and how they are recorded, and which ``metrics.jsonl`` lines it
keeps (docs/reliability.md, "What resuming does").

* :func:`prepare_run_dir`: a new run needs an empty directory (or ``overwrite``), a resumed one a checkpoint;
  temp files of killed writes are removed.
* :class:`ResumePoint`: the checkpoint a resumed run continues from (a simsiam-kit checkpoint with finite
  weights) and the config changes it makes (only the keys of :data:`RESUME_MAY_CHANGE`).
* :func:`prepare_run_files`: ``config.yaml`` and an empty ``metrics.jsonl`` for a new run; for a resumed
  one the new amendments appended to ``config.amendments.yaml`` (``config.yaml`` is never rewritten) and
  the metric lines written after the checkpoint dropped (they are written again).
* :func:`load_run_config`: a run's config, ``config.yaml`` + its amendments + ``--set`` overrides.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from simsiam_kit.config import PretrainConfig, load_config, save_config, to_dict
from simsiam_kit.engine.checkpoint import CHECKPOINT_FORMAT, describe_nonfinite, load_file, nonfinite_tensors
from simsiam_kit.engine.hooks import read_metrics
from simsiam_kit.engine.run_dir import RunDir
from simsiam_kit.errors import UserError
from simsiam_kit.utils.io import atomic_write_text

#: config keys ``--resume --set`` may change: they do not alter the weights a run computes (optim.epochs
#: extends the run; the others are logging, monitoring, the DDP timeout, and the loader's worker count,
#: which the crops do not depend on). Changes are recorded in ``config.amendments.yaml``; ``config.yaml``
#: stays as first written.
RESUME_MAY_CHANGE = (
    "optim.epochs",
    "train.progress",
    "train.log_every",
    "train.plots",
    "train.collapse_warn_std",
    "train.knn_every",
    "train.dist_timeout_s",
    "data.workers",
    "log.tensorboard",
    "log.wandb",
    "log.wandb_project",
    "log.view_pairs",
)


def default_run_dir(cfg: PretrainConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def find_latest_run(name: str) -> Optional[Path]:
    """The newest ``runs/<name>-*`` directory (by modification time) that holds a checkpoint, or None."""
    runs = sorted(Path("runs").glob(f"{name}-*"), key=lambda p: p.stat().st_mtime) if Path("runs").is_dir() else []
    runs = [r for r in runs if RunDir(r).has_checkpoint()]
    return runs[-1] if runs else None


def prepare_run_dir(run: RunDir, resume: bool, overwrite: bool, log: Callable[[str], None]) -> None:
    """Lock the run directory for this process and check that it may be used (rank 0)."""
    run.lock()
    if resume:
        if not run.has_checkpoint():
            raise UserError(f"--resume: no checkpoint at {run.checkpoint}")
    elif not run.is_empty():
        if not overwrite:
            if run.has_checkpoint():
                raise UserError(
                    f"{run} already holds a run; resume it (--resume), replace it (--overwrite) "
                    "or pick another output directory"
                )
            raise UserError(
                f"{run} is not empty and holds no checkpoint to resume; replace its run files "
                "(--overwrite) or pick another output directory"
            )
        run.remove_run_files()
    n, size = run.remove_stale_temp_files()
    if n:
        log(f"removed {n} temp file{'s' if n > 1 else ''} ({size / 1e6:.1f} MB) left by interrupted writes in {run}")


def _read_yaml(path: Path) -> Any:
    """The one YAML read of the resume rules (``config.amendments.yaml``): the project's bounded loader (no
    anchors or aliases, size-capped, regular files only), a one-line error naming the file."""
    from simsiam_kit.config import load_yaml

    return load_yaml(path, expect=list)


def read_amendments(run: RunDir) -> list[dict]:
    """The entries of ``config.amendments.yaml`` (``[{after_epoch, set: {key: value}}]``), oldest first."""
    if not run.amendments.is_file():
        return []
    entries = _read_yaml(run.amendments) or []
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("set"), dict) for e in entries
    ):
        raise UserError(f"{run.amendments}: expected a list of {{after_epoch, set: {{key: value}}}} entries")
    return entries


def load_run_config(run_dir: Path, overrides: list[str] | None) -> PretrainConfig:
    """A run's config: ``config.yaml``, then its recorded amendments, then ``overrides``."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise UserError(f"{run_dir}: no config.yaml, not a simsiam-kit run directory")
    amended = [f"{k}={json.dumps(v)}" for e in read_amendments(run) for k, v in e["set"].items()]
    return load_config(PretrainConfig, str(run.config), amended + list(overrides or []))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(cfg: PretrainConfig, saved: Optional[dict], source: str) -> dict:
    """Keys whose value ``cfg`` changes against the config a checkpoint was written with, as
    ``{key: new value}``; a :class:`UserError` when one of them is not in :data:`RESUME_MAY_CHANGE`."""
    old, new = _flat(saved or {}), _flat(to_dict(cfg))
    changed = {k: v for k, v in new.items() if k in old and old[k] != v}
    for k, v in changed.items():
        if k not in RESUME_MAY_CHANGE:
            raise UserError(
                f"{source}: resuming would change '{k}' from {old[k]!r} to {v!r}; a resumed run keeps its "
                f"config (only {', '.join(RESUME_MAY_CHANGE)} may change): start a new run instead"
            )
    return changed


def load_run_checkpoint(run: RunDir) -> dict:
    """``checkpoints/last.pt`` of ``run``: a simsiam-kit checkpoint whose weights are all finite."""
    if not run.has_checkpoint():
        raise UserError(f"--resume: no checkpoint at {run.checkpoint}")
    ckpt = load_file(run.checkpoint)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{run.checkpoint}: not a simsiam-kit checkpoint")
    bad, total = nonfinite_tensors(ckpt.get("model"))
    if bad:
        raise UserError(
            f"{run.checkpoint}: non-finite weights, {describe_nonfinite(bad, total)}; cannot resume from them"
        )
    return ckpt


@dataclass(frozen=True)
class ResumePoint:
    """What a resumed run continues from: its checkpoint and the config changes it makes."""

    checkpoint: dict
    amendment: dict  # {key: new value}, every key in RESUME_MAY_CHANGE

    @classmethod
    def read(cls, run: RunDir, cfg: PretrainConfig) -> ResumePoint:
        """Read and check ``run``'s checkpoint and ``cfg`` against the config it was written with."""
        ckpt = load_run_checkpoint(run)
        return cls(ckpt, resume_changes(cfg, ckpt.get("config"), f"{run.checkpoint}"))

    @property
    def trainer_state(self) -> dict:
        return self.checkpoint.get("trainer") or self.checkpoint  # version 1 kept epoch/global_step on top

    @property
    def epoch_metrics(self) -> dict:
        """The checkpointed epoch's metrics (what its ``metrics.jsonl`` line is made of)."""
        return self.checkpoint.get("metrics") or {}


def record_amendment(run: RunDir, amendment: dict, after_epoch: int) -> None:
    """Append to ``config.amendments.yaml`` the keys of ``amendment`` whose value differs from the run's
    config as recorded so far (``config.yaml`` + earlier amendments)."""
    if not amendment or not run.config.is_file():
        return
    recorded = _flat(to_dict(load_run_config(run.root, None)))
    new = {k: v for k, v in amendment.items() if recorded.get(k) != v}
    if new:
        import yaml

        entries = read_amendments(run) + [{"after_epoch": after_epoch, "set": new}]
        atomic_write_text(run.amendments, yaml.safe_dump(entries, sort_keys=False))


def trim_metrics(path: Path, completed_epochs: int) -> list:
    """Drop metric lines written after the checkpoint we resume from (they will be written again), and lines
    that are not metric records (a cut line, ``5``, ``{"type": "epoch"}``); returns the latter as
    ``(line number, text)``."""
    rejected: list = []
    recs = read_metrics(path, rejected)
    keep = [
        r
        for r in recs
        if (r.get("type") == "epoch" and r["epoch"] <= completed_epochs)
        or (r.get("type") != "epoch" and r.get("epoch", 0) < completed_epochs)
    ]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return rejected


def epoch_line_missing(run: RunDir, epoch: int) -> bool:
    """Whether ``metrics.jsonl`` lacks the line of completed epoch ``epoch`` (> 0)."""
    lines = read_metrics(run.metrics)
    return epoch > 0 and not any(r.get("type") == "epoch" and r.get("epoch") == epoch for r in lines)


def prepare_run_files(
    run: RunDir, cfg: PretrainConfig, point: Optional[ResumePoint], start_epoch: int, log: Callable = print
) -> bool:
    """The run's files before training (rank 0): a new run writes ``config.yaml`` and an empty
    ``metrics.jsonl``; a resumed one records its amendments and trims ``metrics.jsonl`` to the checkpoint.
    Returns whether the checkpointed epoch ``start_epoch`` still lacks its metrics line (a run killed
    between the checkpoint and the end of the epoch)."""
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    if point is None:
        save_config(cfg, run.config)
        atomic_write_text(run.metrics, "")
        return False
    record_amendment(run, point.amendment, start_epoch)
    dropped = trim_metrics(run.metrics, start_epoch)
    if dropped:
        n, text = dropped[0]
        log(
            f"note: {run.metrics}: dropped {len(dropped)} line(s) that are not metric records "
            f"(line {n}: {text!r}); the other lines are kept"
        )
    return epoch_line_missing(run, start_epoch)
