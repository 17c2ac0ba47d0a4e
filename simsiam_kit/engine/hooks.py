"""Hooks for :class:`simsiam_kit.engine.Trainer`: LR schedule, metrics, progress, checkpoints,
collapse and kNN monitors.

Hooks run in the order they are registered. Pretraining registers them (``Pretrainer.build_hooks`` in
``simsiam_kit/pretrain.py``) as: the CPU thread re-check (:class:`ThreadRecheck`), the schedule, throughput
and epoch averages, the collapse monitor, then
the :class:`Checkpointer` (the epoch's weights are safe on disk before anything else runs), then the
:class:`KNNMonitor` and the online probe's monitor, then the :class:`MetricsWriter` (its epoch line
carries the monitors' results), and the :class:`ProgressBar` last. A run killed after its checkpoint but
before the epoch line resumes by running the hooks registered after the checkpointer for that epoch
again (``Trainer.finish_epoch``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from simsiam_kit.engine.checkpoint import Checkpointables, describe_nonfinite, nonfinite_tensors, save_checkpoint
from simsiam_kit.engine.trainer import Hook, Trainer
from simsiam_kit.errors import TrainingDiverged
from simsiam_kit.utils import dist
from simsiam_kit.utils.device import CpuSampler, recheck_threads
from simsiam_kit.utils.io import append_text, defer_sigint


def _f(v):
    return float(v.item()) if torch.is_tensor(v) else float(v)


def _drain() -> None:
    """Wait for queued GPU work, so a wall-clock reading counts work done, not work queued."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class LRSchedule(Hook):
    """Cosine (or constant) learning rate with optional linear warm-up.

    Official SimSiam code: ``lr = init_lr * 0.5 * (1 + cos(pi * epoch / epochs))`` set once per epoch;
    ``lr_per_step=True`` evaluates it at fractional epochs. Param groups with ``fix_lr=True`` (the
    predictor under ``fix_pred_lr``) stay at the initial lr, as in the official code.
    """

    def __init__(
        self,
        optimizer,
        init_lr: float,
        epochs: int,
        warmup_epochs: float = 0.0,
        schedule: str = "cosine",
        per_step: bool = False,
    ):
        self.opt, self.init_lr, self.epochs = optimizer, init_lr, epochs
        self.warmup, self.schedule, self.per_step = warmup_epochs, schedule, per_step

    def lr_at(self, epoch_float: float) -> float:
        if self.warmup > 0 and epoch_float < self.warmup:
            return self.init_lr * epoch_float / self.warmup
        if self.schedule == "constant":
            return self.init_lr
        return self.init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch_float / self.epochs))

    def before_step(self, trainer) -> None:
        e = trainer.epoch
        if self.per_step or self.warmup > 0:
            e = trainer.epoch + trainer.step_in_epoch / max(1, trainer.steps_per_epoch)
        lr = self.lr_at(e)
        for g in self.opt.param_groups:
            g["lr"] = self.init_lr if g.get("fix_lr", False) else lr
        trainer.state["lr"] = lr

    def after_epoch(self, trainer) -> None:
        if "lr" in trainer.state:  # part of the epoch's record, so a checkpoint carries it too
            trainer.epoch_metrics["lr"] = trainer.state["lr"]


class Throughput(Hook):
    """Images per second over each epoch's steps after the first (warm-up), by the wall clock from the
    end of the first step to the end of the last, data loading and per-step hooks included. The GPU
    queue is drained at both ends only (two syncs per epoch), so steps are counted when they ran, not
    when they were queued; the mid-epoch value shown by the progress bar is approximate on a GPU."""

    def before_epoch(self, trainer) -> None:
        self.images, self.rate = 0, 0.0
        self.t0: Optional[float] = None

    def after_step(self, trainer) -> None:
        n = int(trainer.outputs.get("images", 0)) * dist.get_world_size()
        if trainer.steps_per_epoch == 1:  # nothing to warm up on: time the only step
            _drain()
            dt = time.perf_counter() - trainer.step_start
            self.rate = n / dt if dt > 0 else 0.0
        elif self.t0 is None:
            _drain()
            self.t0 = time.perf_counter()
        else:
            self.images += n
            dt = time.perf_counter() - self.t0
            self.rate = self.images / dt if dt > 0 else 0.0
        trainer.state["images_per_s"] = self.rate

    def after_epoch(self, trainer) -> None:
        if self.t0 is not None and self.images:
            _drain()
            self.rate = self.images / (time.perf_counter() - self.t0)
        trainer.epoch_metrics["images_per_s"] = self.rate


class EpochAverages(Hook):
    """Mean of each step output over the epoch (loss, std, ...), reduced over ranks. Tensor outputs are
    summed where they live (no host sync per step); the sums are read once, at the end of the epoch."""

    def before_epoch(self, trainer) -> None:
        self.sums: dict = {}
        self.n = 0

    def after_step(self, trainer) -> None:
        self.n += 1
        for k, v in trainer.outputs.items():
            if k in ("images",):
                continue
            v = v.detach().double() if torch.is_tensor(v) else float(v)
            self.sums[k] = v if k not in self.sums else self.sums[k] + v

    def after_epoch(self, trainer) -> None:
        for k, v in self.sums.items():
            t = dist.all_reduce_mean(torch.tensor(_f(v) / max(1, self.n), dtype=torch.float64))
            trainer.epoch_metrics[k] = float(t)


class ThreadRecheck(Hook):
    """Re-choose the CPU thread count at every epoch boundary from the idle CPU time of the epoch that just
    ended (:func:`~simsiam_kit.utils.device.recheck_threads`: ``/proc/stat`` less this process's own time, two
    reads of a file per epoch), so a run that started during someone else's job takes the cores back when
    that job ends, and gives one back when another starts. A count from ``OMP_NUM_THREADS`` (or one the
    command line did not choose) is never changed. Registered first, so the epoch's end (checkpoint, kNN
    monitor) already runs with the new count; ``sampler`` builds the sampler (tests give a fake one)."""

    def __init__(self, log: Callable[[str], None] = print, sampler: Callable | None = None):
        self.log, self.make_sampler = log, sampler
        self.sampler: Any = None  # a CpuSampler once training starts

    def before_train(self, trainer) -> None:
        self.sampler = (self.make_sampler or CpuSampler)()

    def after_epoch(self, trainer) -> None:
        if self.sampler is not None:
            recheck_threads(self.sampler, self.log)


class CollapseMonitor(Hook):
    """Warn when the std of the l2-normalised projector output falls toward 0 (paper Fig. 2)."""

    def __init__(self, dim: int, warn_ratio: float = 0.1, log: Callable[[str], None] = print):
        self.dim, self.ratio, self.log = dim, warn_ratio, log

    def after_epoch(self, trainer) -> None:
        std = trainer.epoch_metrics.get("std")
        if std is None:
            return
        trainer.epoch_metrics["std_x_sqrt_d"] = std * math.sqrt(self.dim)
        if std * math.sqrt(self.dim) < self.ratio and dist.is_main():
            self.log(
                f"warning: output std {std:.4f} is below {self.ratio:g}/sqrt(d) = "
                f"{self.ratio / math.sqrt(self.dim):.4f} "
                "(healthy is about 1/sqrt(d)): the representation may be collapsing"
            )


class KNNMonitor(Hook):
    """Weighted kNN accuracy of backbone features every ``every`` epochs (and at the end), rank 0.
    Registered after the :class:`Checkpointer`: whatever happens in it, the epoch's weights are saved.
    Under DDP the other ranks wait for rank 0's score (:func:`simsiam_kit.utils.dist.on_main`) and raise its
    error with it, rather than wait for a rank that stopped.

    A run that starts from scratch (not a resumed one) is scored once more before its first step: the
    epoch-0 point, the run's own initial weights, i.e. its random-init baseline. ``record`` receives that
    point as an epoch line (``{"type": "epoch", "epoch": 0, "step": 0, "knn_top1": ...}``). ``log`` prints
    each score after its epoch's progress bar has closed."""

    def __init__(
        self,
        evaluate: Callable[[], float],
        every: int,
        record: Callable[[dict], None] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.evaluate, self.every, self.record, self.log = evaluate, every, record, log
        self.initial: Optional[float] = None  # epoch 0 of this process's run (None when resumed)
        self._pending: Optional[str] = None

    def before_train(self, trainer) -> None:
        if self.every <= 0 or trainer.start_epoch > 0:  # resuming: epoch 0 is in metrics.jsonl already
            return

        def initial() -> float:
            acc = self.evaluate()
            if self.record is not None:
                self.record({"type": "epoch", "epoch": 0, "step": 0, "knn_top1": acc})
            return acc

        acc = dist.on_main(initial)  # collective: an error on rank 0 (NaN features, ...) stops every rank
        if dist.is_main():
            self.initial = acc
            self._say(f"epoch 0/{trainer.epochs} (initial weights): kNN top-1 {acc:.2f} %")

    def after_epoch(self, trainer) -> None:
        last = trainer.epoch == trainer.epochs
        if self.every <= 0 or not (trainer.epoch % self.every == 0 or last):
            return
        acc = dist.on_main(self.evaluate)  # collective, as in before_train
        if dist.is_main():
            trainer.epoch_metrics["knn_top1"] = acc
            self._pending = f"epoch {trainer.epoch}/{trainer.epochs}: kNN top-1 {acc:.2f} %" + (
                f" (epoch 0: {self.initial:.2f} %)" if self.initial is not None else ""
            )

    def _say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def _flush(self) -> None:
        if self._pending is not None:
            self._say(self._pending)
            self._pending = None

    def before_epoch(self, trainer) -> None:
        self._flush()  # after the previous epoch's progress bar is closed

    def after_train(self, trainer) -> None:
        self._flush()


class Checkpointer(Hook):
    """Save the named objects of ``objects``, the trainer's progress and hook state, the epoch's metrics and
    ``extra`` to ``path`` (atomically) every ``every`` epochs and at the end, before the monitors and the
    metrics line of the epoch.

    Finite weights only: ``check(trainer)`` runs first (the step function's pending loss check), then every
    floating tensor of the state is tested on every rank; one that holds a nan or an infinity (an update
    can diverge with a finite loss) stops training with :class:`TrainingDiverged`, and the last good
    checkpoint stays. ``companion(progress)`` writes the file that goes with the checkpoint (a run's
    ``backbone.pt``) just before it, in the same block Ctrl-C waits for, so it is never the older one.

    Collective under DDP (the state gathers every rank's RNG streams, the ranks agree on finiteness);
    rank 0 writes."""

    def __init__(
        self,
        objects: Checkpointables,
        path: Path,
        every: int,
        extra: dict | None = None,
        check: Callable[[Trainer], None] | None = None,
        companion: Callable[[dict], None] | None = None,
    ):
        self.objects, self.path, self.every = objects, Path(path), every
        self.extra, self.check, self.companion = dict(extra or {}), check, companion

    def after_epoch(self, trainer) -> None:
        if trainer.epoch % self.every == 0 or trainer.epoch == trainer.epochs:
            self.save(trainer)
            dist.barrier()

    def save(self, trainer) -> None:
        if self.check is not None:
            self.check(trainer)  # never write weights from a step whose loss was not finite
        state = self.objects.state_dict()  # collective under DDP (RNG states of every rank)
        bad, total = nonfinite_tensors(state)
        if dist.any_rank(bool(bad)):
            raise TrainingDiverged(
                f"weights became non-finite in epoch {trainer.epoch} (step {trainer.global_step}): "
                f"{describe_nonfinite(bad, total) if bad else 'on another process'}; training stopped, the last good "
                "checkpoint is kept (try a lower optim.base_lr or optim.weight_decay, or train.precision=fp32)"
            )
        if not dist.is_main():
            return
        progress = {"epoch": trainer.epoch, "global_step": trainer.global_step}
        with defer_sigint():  # Ctrl-C waits for the pair; the companion goes first, so it is never the older one
            if self.companion is not None:
                self.companion(progress)
            payload = {**state, "trainer": trainer.state_dict(), **progress, **self.extra}
            save_checkpoint(self.path, **payload, metrics=trainer.epoch_metrics)


class ProgressBar(Hook):
    def __init__(self, enabled: bool = True, desc: str = "train", postfix_every_s: float = 1.0):
        self.enabled = enabled and dist.is_main()
        self.desc = desc
        self.bar: Any = None  # a tqdm bar while an epoch runs
        self.postfix_every_s = postfix_every_s  # reading a GPU value waits for the GPU: about once a second
        self._last = 0.0

    def before_epoch(self, trainer) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=trainer.steps_per_epoch,
                desc=f"{self.desc} {trainer.epoch + 1}/{trainer.epochs}",
                leave=True,
                dynamic_ncols=True,
            )

    def after_step(self, trainer) -> None:
        if self.bar is not None:
            now = time.monotonic()
            if now - self._last >= self.postfix_every_s or trainer.step_in_epoch + 1 == trainer.steps_per_epoch:
                self._last = now
                o = trainer.outputs
                post = {}
                for k in ("loss", "std", "acc"):
                    if k in o:
                        post[k] = f"{_f(o[k]):.4f}"
                post["img/s"] = f"{trainer.state.get('images_per_s', 0):.1f}"
                self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def after_epoch(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsWriter(Hook):
    """One JSON object per line in ``metrics.jsonl``: step lines every ``every`` steps and one epoch line.

    Registered after the checkpointer and the monitors (so the epoch line has their values): every epoch line
    describes a checkpointed epoch (or one between checkpoints, which resuming trims and writes again).
    A run killed after a checkpoint and before its epoch line writes that line when it resumes."""

    def __init__(self, path: Path, every: int = 10, sinks: Sequence = ()):
        self.path, self.every = Path(path), every
        self.sinks = list(sinks)  # TensorBoard / W&B (engine/loggers.py): the same records
        self.t0 = time.time()

    def write(self, obj: dict) -> None:
        """Append one record to metrics.jsonl and hand it to every sink (rank 0)."""
        if not dist.is_main():
            return
        append_text(self.path, json.dumps(obj) + "\n")
        for s in self.sinks:
            s.scalars(obj)

    def after_train(self, trainer) -> None:
        for s in self.sinks:  # the owner closes them (after adding its final plots)
            s.flush()

    def after_step(self, trainer) -> None:
        if self.every > 0 and trainer.global_step % self.every == 0:
            rec = {"type": "step", "epoch": trainer.epoch, "step": trainer.global_step}
            rec.update({k: _f(v) for k, v in trainer.outputs.items() if k != "images"})
            rec["lr"] = trainer.state.get("lr")
            rec["images_per_s"] = round(trainer.state.get("images_per_s", 0.0), 2)
            self.write(rec)

    def after_epoch(self, trainer) -> None:
        rec = {
            "type": "epoch",
            "epoch": trainer.epoch,
            "step": trainer.global_step,
            "lr": trainer.state.get("lr"),
            "time_s": round(time.time() - self.t0, 2),
        }
        rec.update(trainer.epoch_metrics)
        self.write(rec)


def _metric_record(obj) -> bool:
    """Whether a decoded ``metrics.jsonl`` line is a record this project wrote: an object whose ``type`` is a
    string, whose ``epoch`` and ``step`` (when present; an epoch line must have both) are integers and whose
    other values are numbers, strings, booleans or null (lists of those for a few keys)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("type", "step"), str):
        return False
    if obj.get("type") == "epoch" and not ("epoch" in obj and "step" in obj):
        return False
    for key in ("epoch", "step"):
        if key in obj and (not isinstance(obj[key], int) or isinstance(obj[key], bool)):
            return False
    return all(v is None or isinstance(v, (int, float, str, bool, list)) for v in obj.values())


def read_metrics(path: Path, rejected: Optional[list] = None) -> list[dict]:
    """The records of ``metrics.jsonl``. A line cut by a kill, or one that is not a record this project
    writes (``5``, ``{"type": "epoch"}`` without its epoch), is skipped; ``rejected`` (a list) receives
    ``(line number, the line's first 60 characters)`` of each skipped line."""
    out: list[dict] = []
    p = Path(path)
    if not p.is_file():
        return out
    for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError):  # a line cut by a kill, or not JSON
            obj = None
        if obj is not None and _metric_record(obj):
            out.append(obj)
        elif rejected is not None:
            rejected.append((n, line[:60]))
    return out
