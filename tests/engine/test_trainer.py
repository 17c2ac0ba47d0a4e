"""The training core on a toy model: a step worked out by hand, hooks in registration order, the end of a
checkpointed epoch run again, checkpointables saved and loaded into fresh objects, and the checkpointer's
finite-weights rule."""

import pytest
import torch

from simsiam_kit.engine import Hook, Trainer
from simsiam_kit.engine.checkpoint import Checkpointables, ModelState, RNGState, load_file, save_checkpoint
from simsiam_kit.engine.hooks import Checkpointer
from simsiam_kit.engine.step import OptimStep
from simsiam_kit.errors import TrainingDiverged, UserError


class Recorder(Hook):
    """Appends ``(name, event)`` to a shared log at every event; its state is the number of epochs it saw."""

    def __init__(self, name: str, log: list):
        self.name, self.log, self.epochs_seen = name, log, 0

    def before_train(self, trainer) -> None:
        self.log.append((self.name, "before_train"))

    def before_epoch(self, trainer) -> None:
        self.log.append((self.name, "before_epoch"))

    def before_step(self, trainer) -> None:
        self.log.append((self.name, "before_step"))

    def after_step(self, trainer) -> None:
        self.log.append((self.name, "after_step"))

    def after_epoch(self, trainer) -> None:
        self.log.append((self.name, "after_epoch"))
        self.epochs_seen += 1

    def after_train(self, trainer) -> None:
        self.log.append((self.name, "after_train"))

    def state_dict(self) -> dict:
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state: dict) -> None:
        self.epochs_seen = state["epochs_seen"]


class ScalarStep:
    """Fits ``w * x`` to ``y`` with squared error: one :class:`OptimStep` per batch."""

    def __init__(self, model: torch.nn.Linear, optimizer: torch.optim.Optimizer):
        self.model, self.update = model, OptimStep(optimizer)

    def __call__(self, batch, trainer) -> dict:
        x, y = batch
        loss = ((self.model(x) - y) ** 2).mean()
        self.update(loss)
        return {"loss": loss.detach()}


def scalar_model(momentum: float = 0.0):
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    return model, torch.optim.SGD(model.parameters(), lr=0.25, momentum=momentum)


BATCH = (torch.tensor([[1.0]]), torch.tensor([[2.0]]))  # loss (w - 2)^2, gradient 2 (w - 2)


def test_toy_step_by_hand():
    model, opt = scalar_model()
    trainer = Trainer(ScalarStep(model, opt), [BATCH, BATCH, BATCH], epochs=2, max_steps_per_epoch=2)
    trainer.train()
    # w: 0 -> 0 - 0.25 * (-4) = 1 -> 1.5 -> 1.75 -> 1.875 (four steps: two epochs of two)
    assert model.weight.item() == 1.875
    assert (trainer.epoch, trainer.global_step, trainer.steps_per_epoch) == (2, 4, 2)
    assert trainer.outputs["loss"].item() == (1.75 - 2) ** 2  # the last step's loss, before its update


def test_hooks_run_in_registration_order():
    log: list = []
    model, opt = scalar_model()
    hooks = [Recorder(n, log) for n in ("c", "a", "b")]  # not sorted by anything
    trainer = Trainer(ScalarStep(model, opt), [BATCH], epochs=2, hooks=hooks[:2])
    trainer.register_hooks(hooks[2:])
    trainer.train()
    order = ["c", "a", "b"]
    one_epoch = [(n, e) for e in ("before_epoch", "before_step", "after_step", "after_epoch") for n in order]
    assert log == [(n, "before_train") for n in order] + one_epoch * 2 + [(n, "after_train") for n in order]


class Marker(Hook):
    pass


def test_finish_epoch_runs_the_hooks_registered_after_the_cut():
    log: list = []
    model, opt = scalar_model()
    seen = {}

    class Reads(Hook):
        def after_epoch(self, trainer) -> None:
            seen.update(trainer.epoch_metrics)

    trainer = Trainer(ScalarStep(model, opt), [BATCH], 1, [Recorder("a", log), Marker(), Recorder("b", log), Reads()])
    trainer.finish_epoch({"loss": 0.5}, after=Marker)
    assert log == [("b", "after_epoch")] and seen == {"loss": 0.5}
    log.clear()
    trainer.finish_epoch({"loss": 0.5}, after=Checkpointer)  # no such hook: nothing runs
    assert log == []


def trained(momentum: float = 0.9):
    """A toy model, optimizer (with momentum buffers), generator and trainer after one epoch."""
    model, opt = scalar_model(momentum)
    gen = torch.Generator().manual_seed(3)
    trainer = Trainer(ScalarStep(model, opt), [BATCH, BATCH], epochs=1, hooks=[Recorder("r", [])])
    trainer.train()
    objects = Checkpointables(model=ModelState(model), optimizer=opt, rng=RNGState(gen), scaler=None)
    return model, opt, gen, trainer, objects


def test_checkpointables_round_trip(tmp_path):
    model, opt, gen, trainer, objects = trained()
    path = tmp_path / "last.pt"
    save_checkpoint(path, **objects.state_dict(), trainer=trainer.state_dict())
    payload = load_file(path)
    assert "scaler" not in payload  # a None checkpointable is left out

    model2, opt2 = scalar_model(0.9)
    gen2 = torch.Generator().manual_seed(99)
    trainer2 = Trainer(ScalarStep(model2, opt2), [BATCH, BATCH], epochs=2, hooks=[Recorder("r", [])])
    Checkpointables(model=ModelState(model2), optimizer=opt2, rng=RNGState(gen2)).load_state_dict(payload)
    trainer2.load_state_dict(payload["trainer"])

    assert torch.equal(model2.weight, model.weight)
    buf, buf2 = (o.state[o.param_groups[0]["params"][0]]["momentum_buffer"] for o in (opt, opt2))
    assert torch.equal(buf, buf2)
    assert torch.equal(torch.rand(4, generator=gen2), torch.rand(4, generator=gen))  # the same stream goes on
    assert (trainer2.start_epoch, trainer2.global_step, trainer2.hooks[0].epochs_seen) == (1, 2, 1)
    trainer2.train()  # the second epoch continues from the loaded state: the same update as uninterrupted
    trainer.epochs = 2
    trainer.start_epoch = 1
    trainer.train()
    assert torch.equal(model2.weight, model.weight)


def test_missing_checkpointable_is_named(tmp_path):
    _, _, _, _, objects = trained()
    state = objects.state_dict()
    del state["optimizer"]
    with pytest.raises(UserError, match=r"^run/last.pt: the checkpoint has no 'optimizer' state$"):
        objects.load_state_dict(state, source="run/last.pt")
    state = objects.state_dict()
    state["model"] = {"weight": torch.zeros(2, 1)}  # another shape
    with pytest.raises(UserError, match=r"run/last.pt: the saved 'model' state does not fit this run"):
        objects.load_state_dict(state, source="run/last.pt")


def test_checkpointer_saves_finite_weights_only(tmp_path):
    """Epoch 1 is saved (companion first); in epoch 2 the step leaves a nan in the weight: training stops
    and the file keeps epoch 1."""
    model, opt = scalar_model()
    step = ScalarStep(model, opt)
    calls = []

    def poisoning(batch, trainer):
        out = step(batch, trainer)
        if trainer.epoch == 1:
            with torch.no_grad():
                model.weight.fill_(float("nan"))
        return out

    path = tmp_path / "last.pt"
    ck = Checkpointer(
        Checkpointables(model=ModelState(model), optimizer=opt),
        path,
        every=1,
        extra={"config": {"seed": 0}},
        check=lambda trainer: calls.append(("check", trainer.epoch)),
        companion=lambda progress: calls.append(("companion", progress)),
    )
    trainer = Trainer(poisoning, [BATCH], epochs=2, hooks=[ck])
    with pytest.raises(TrainingDiverged, match="weights became non-finite in epoch 2 .*1 of 1 floating tensors"):
        trainer.train()
    assert calls == [("check", 1), ("companion", {"epoch": 1, "global_step": 1}), ("check", 2)]
    saved = load_file(path)
    assert (saved["epoch"], saved["global_step"], saved["config"]) == (1, 1, {"seed": 0})
    assert saved["trainer"]["epoch"] == 1 and saved["model"]["weight"].item() == 1.0
