"""One small training core; everything else is a hook (cf. detectron2 ``engine/train_loop.py``).

Pretraining and the linear probe both run :class:`Trainer` with their own step function.
A step function takes ``(batch, trainer)`` and returns a dict of scalars (floats or 0-d tensors),
which hooks read from ``trainer.outputs``; hooks add per-epoch values to ``trainer.epoch_metrics``.

Hooks run in the order they are registered (detectron2 ``TrainerBase.register_hooks``), at every event:
a hook that reads what another writes into ``epoch_metrics`` is registered after it.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional


class Hook:
    """Callbacks of :class:`Trainer`; each does nothing unless overridden."""

    def before_train(self, trainer: "Trainer") -> None: ...

    def before_epoch(self, trainer: "Trainer") -> None: ...

    def before_step(self, trainer: "Trainer") -> None: ...

    def after_step(self, trainer: "Trainer") -> None: ...

    def after_epoch(self, trainer: "Trainer") -> None: ...

    def after_train(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> Optional[dict]:
        """State to checkpoint (None: the hook has none); restored by :meth:`load_state_dict`."""
        return None

    def load_state_dict(self, state: dict) -> None: ...


class Trainer:
    def __init__(
        self,
        step_fn: Callable,
        loader,
        epochs: int,
        hooks: Iterable[Hook] = (),
        start_epoch: int = 0,
        global_step: int = 0,
        max_steps_per_epoch: int = 0,
    ):
        self.step_fn = step_fn
        self.loader = loader
        self.epochs = epochs
        self.hooks: list[Hook] = []
        self.register_hooks(hooks)
        self.epoch = start_epoch
        self.start_epoch = start_epoch
        self.global_step = global_step
        self.max_steps_per_epoch = max_steps_per_epoch
        self.outputs: dict = {}
        self.epoch_metrics: dict = {}
        self.step_in_epoch = 0
        self.step_time = 0.0  # host time of the last step (on a GPU: the time to queue it, see Throughput)
        self.step_start = 0.0
        self.state: dict = {}  # free-form shared state between hooks

    def register_hooks(self, hooks: Iterable[Hook]) -> None:
        """Append ``hooks``; they run after those registered before, in the order given."""
        self.hooks.extend(hooks)

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.loader)
        return min(n, self.max_steps_per_epoch) if self.max_steps_per_epoch > 0 else n

    def _call(self, name: str) -> None:
        for h in self.hooks:
            getattr(h, name)(self)

    def train(self) -> None:
        self._call("before_train")
        for epoch in range(self.start_epoch, self.epochs):
            self.epoch = epoch
            self.epoch_metrics = {}
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(epoch)
            self._call("before_epoch")
            steps = self.steps_per_epoch
            it = iter(self.loader)
            for i in range(steps):
                self.step_in_epoch = i
                t0 = self.step_start = time.perf_counter()
                batch = next(it)
                self._call("before_step")
                self.outputs = self.step_fn(batch, self)
                self.step_time = time.perf_counter() - t0
                self.global_step += 1
                self._call("after_step")
            del it
            self.epoch = epoch + 1  # number of completed epochs from here on
            self._call("after_epoch")
        self._call("after_train")

    def finish_epoch(self, epoch_metrics: dict, after: type) -> None:
        """Run ``after_epoch`` again for the hooks registered after the (first) hook of type ``after``, on the
        completed epoch ``self.epoch`` with its saved ``epoch_metrics``: the end of an epoch that a killed
        run checkpointed but did not finish (its kNN monitor, its metrics line)."""
        cut = next((i for i, h in enumerate(self.hooks) if isinstance(h, after)), None)
        if cut is None:
            return
        self.epoch_metrics = dict(epoch_metrics)
        for h in self.hooks[cut + 1 :]:
            h.after_epoch(self)

    def state_dict(self) -> dict:
        """Progress and the state of every hook that has one, keyed by hook class."""
        hooks = {type(h).__name__: h.state_dict() for h in self.hooks}
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "hooks": {k: v for k, v in hooks.items() if v is not None},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the checkpointed epoch (``epoch`` = completed epochs)."""
        self.epoch = self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        for h in self.hooks:
            if type(h).__name__ in state.get("hooks", {}):
                h.load_state_dict(state["hooks"][type(h).__name__])
