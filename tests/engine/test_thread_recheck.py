"""The CPU thread count re-checked at epoch boundaries (issue 25): a run that started during someone else's job
takes the cores back when it ends. /proc/stat is faked with numbers worked by hand; the trainer is real."""

import pytest
import torch

from simsiam_kit.engine import Hook, Trainer
from simsiam_kit.engine.hooks import ThreadRecheck
from simsiam_kit.utils import device
from simsiam_kit.utils.device import CpuSampler

from helpers import tiny_overrides


def _stat(rows):
    """A /proc/stat text: (user, nice, system, idle, iowait) per cpuN, after the aggregate line."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{i} {u} {n} {s} {idle} {io} 0 0 0 0 0" for i, (u, n, s, idle, io) in enumerate(rows)]
    return "\n".join(lines)


class FakeProc:
    """Cumulative /proc/stat frames and this process's own CPU jiffies, one frame per sampler snapshot."""

    def __init__(self, frames):
        self.frames, self.i = frames, -1

    def reader(self):
        self.i += 1
        return device.read_proc_stat(_stat(self.frames[self.i][0]))

    def own(self):
        return self.frames[self.i][1]


# 2 usable cores, 100 jiffies per core per epoch. Worked by hand:
#   epoch 0: cpu0 busy 100 (another job), cpu1 busy 60 (this process, own 60): others 100 of 200 -> 1.0 core
#            -> threads_for(2, 1.0) = 1 (unchanged)
#   epoch 1: cpu0 busy 10, cpu1 busy 90, all of it this process's (own +100): others 0 -> 2 threads
#   epoch 2: cpu0 busy 100, cpu1 busy 100, this process 100 of it: others 100 of 200 -> 1.0 core -> 1 thread
FRAMES = [
    ([(0, 0, 0, 0, 0), (0, 0, 0, 0, 0)], 0),
    ([(100, 0, 0, 0, 0), (60, 0, 0, 40, 0)], 60),
    ([(110, 0, 0, 90, 0), (150, 0, 0, 50, 0)], 160),
    ([(210, 0, 0, 90, 0), (250, 0, 0, 50, 0)], 260),
]


class ThreadsSeen(Hook):
    def __init__(self):
        self.seen = []

    def before_epoch(self, trainer) -> None:
        self.seen.append(torch.get_num_threads())


def _train(epochs=3):
    fake = FakeProc(FRAMES)
    said, seen = [], ThreadsSeen()
    hook = ThreadRecheck(said.append, sampler=lambda: CpuSampler(cpus={0, 1}, reader=fake.reader, own=fake.own))
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(batch, trainer):
        opt.zero_grad()
        loss = (model(batch) ** 2).mean()
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    Trainer(step, [torch.ones(2, 1)], epochs, hooks=[hook, seen]).train()
    return seen.seen, said


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_thread_count_follows_the_idle_time_of_each_epoch(monkeypatch, threads_restored):
    monkeypatch.setattr(device, "_THREADS", {"chosen_by": "auto", "usable_cores": 2, "threads": 1})
    seen, said = _train()
    # epoch 0 and 1 with 1 thread (the other job ran through epoch 0), epoch 2 with both cores
    assert seen == [1, 1, 2]
    assert torch.get_num_threads() == 1  # the job that started during epoch 2 takes one back
    assert said == [
        "CPU threads: 1 -> 2 (other processes kept 0 of 2 usable cores busy during the last epoch)",
        "CPU threads: 2 -> 1 (other processes kept 1 of 2 usable cores busy during the last epoch)",
    ]
    assert device.thread_settings()["measured_by"] == "/proc/stat over the last epoch"


def test_omp_num_threads_is_never_changed(monkeypatch, threads_restored):
    monkeypatch.setattr(device, "_THREADS", {"chosen_by": "OMP_NUM_THREADS", "usable_cores": 2, "threads": 1})
    seen, said = _train()
    assert seen == [1, 1, 1] and said == [] and torch.get_num_threads() == 1


def test_pretraining_rechecks_threads_between_epochs(monkeypatch, tmp_path, tiny_npz, threads_restored):
    """Wired into ``simsiam-kit pretrain``: the run says when the count changes, and its summary records it."""
    import json

    import simsiam_kit.engine.hooks as hooks

    from helpers import cli

    busy = iter([1.0, 0.0])
    sampler = type("Sampler", (), {"sample": lambda self: next(busy)})
    monkeypatch.setattr(hooks, "CpuSampler", sampler)
    monkeypatch.setattr(device, "_THREADS", {"chosen_by": "auto", "usable_cores": 2, "threads": 1})
    out = tmp_path / "run"
    r = cli("pretrain", "--output", out, sets=tiny_overrides(str(tiny_npz), None, epochs=2))
    assert r.exit_code == 0, r.output
    assert "CPU threads: 1 -> 2 (other processes kept 0 of 2 usable cores busy during the last epoch)" in r.output
    assert r.output.count("CPU threads:") == 1  # epoch 0 left it at 1
    threads = json.loads((out / "results" / "pretrain.json").read_text())["threads"]
    assert (threads["threads"], threads["measured_by"]) == (2, "/proc/stat over the last epoch")
