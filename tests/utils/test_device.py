"""The CPU thread rule: measured idle time, not the lagging load average (issue: fast on every CPU)."""

import pytest
import torch

from simsiam_kit.utils import device
from simsiam_kit.utils.device import CpuSampler, choose_threads, recheck_threads, threads_for


def _stat(rows):
    """A /proc/stat text: rows of (user, nice, system, idle, iowait) per cpuN, plus the aggregate line."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{i} {u} {n} {s} {idle} {io} 0 0 0 0 0" for i, (u, n, s, idle, io) in enumerate(rows)]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 99"])


class FakeProc:
    def __init__(self, frames, own):
        self.frames, self.own_frames, self.i = frames, own, 0

    def reader(self):
        return device.read_proc_stat(self.frames[self.i])

    def own(self):
        return self.own_frames[self.i]


def test_sampler_counts_other_processes_only_on_usable_cores():
    # cpu0: 50 of 100 jiffies busy; cpu1: 100 of 100 busy (incl. 10 iowait counted idle -> 90); cpu2 not ours
    before = _stat([(0, 0, 0, 0, 0), (0, 0, 0, 0, 0), (0, 0, 0, 0, 0)])
    after = _stat([(40, 0, 10, 50, 0), (80, 5, 5, 0, 10), (100, 0, 0, 0, 0)])
    fake = FakeProc([before, after], own=[0, 40])  # this process used 40 of the busy jiffies itself
    s = CpuSampler(cpus={0, 1}, reader=fake.reader, own=fake.own)
    fake.i = 1
    # busy 50 + 90 = 140 of 200; others 140 - 40 = 100 -> 2 cores * 100/200 = 1.0 core busy
    assert s.sample() == pytest.approx(1.0)
    assert threads_for(2, 1.0) == 1 and threads_for(2, 0.4) == 2 and threads_for(8, 2.0) == 6


def test_sampler_is_unknown_without_proc_stat():
    s = CpuSampler(cpus={0}, reader=lambda: None, own=lambda: 0)
    assert s.sample() is None


def test_choose_threads_uses_the_measurement_not_the_load_average(monkeypatch):
    # the situation of the issue: a job just ended, the load average still says 1.21, the cores are idle now
    monkeypatch.setattr(device, "load_average", lambda: 1.21)
    monkeypatch.setattr(device, "measure_busy_cores", lambda seconds=0.5: 0.05)
    c = choose_threads({}, cores=2)
    assert (c["threads"], c["chosen_by"], c["busy"], c["measured_by"]) == (2, "auto", False, "/proc/stat over 0.5 s")
    assert c["load_average"] == 1.21 and c["busy_cores"] == 0.05
    # where /proc/stat cannot be read, the load average is the fallback
    monkeypatch.setattr(device, "measure_busy_cores", lambda seconds=0.5: None)
    c = choose_threads({}, cores=2)
    assert (c["threads"], c["measured_by"]) == (1, "1-minute load average")


def test_recheck_at_epoch_boundary_raises_threads_when_the_other_job_ends(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(device, "_THREADS", {"chosen_by": "auto", "usable_cores": 2, "threads": 1})
    try:
        torch.set_num_threads(1)
        busy = iter([0.1])
        sampler = type("S", (), {"sample": lambda self: next(busy)})()
        said = []
        assert recheck_threads(sampler, said.append) == 2
        assert torch.get_num_threads() == 2
        assert said == ["CPU threads: 1 -> 2 (other processes kept 0.1 of 2 usable cores busy during the last epoch)"]
        # OMP_NUM_THREADS given: never changed
        monkeypatch.setattr(device, "_THREADS", {"chosen_by": "OMP_NUM_THREADS", "usable_cores": 2})
        assert recheck_threads(sampler) is None
    finally:
        torch.set_num_threads(threads)


def test_cpu_facts_read_model_and_the_flags_that_matter():
    """What every benchmark JSON and every cached runtime choice records about the CPU: the model name and the four
    flags that decide the fast low-precision path, from /proc/cpuinfo text (the first processor's entry)."""
    from simsiam_kit.utils.device import cpu_facts

    xeon = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n\n"
        "processor\t: 1\nmodel name\t: something else\nflags\t\t: fpu\n"
    )
    assert cpu_facts(xeon) == {
        "model": "Intel(R) Xeon(R) Platinum 8480+",
        "flags": {"avx512_bf16": True, "amx_bf16": True, "amx_int8": True, "avx512_vnni": True},
    }
    epyc = "model name\t: AMD EPYC 9654\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n"
    assert cpu_facts(epyc)["flags"] == {"avx512_bf16": True, "amx_bf16": False, "amx_int8": False, "avx512_vnni": True}
    # a flag is a whole word: "amx_bf16x" or a substring of another flag does not count
    assert cpu_facts("model name: X\nflags: amx_bf16x avx512_bf16_extra\n")["flags"]["amx_bf16"] is False


@pytest.mark.parametrize("argv, sampled", [([], False), (["--help"], False), (["eval", "knn", "-h"], False)])
def test_help_skips_the_idle_time_sample(monkeypatch, argv, sampled):
    """``simsiam-kit --help`` computes nothing: no 0.5 s /proc/stat sample before it prints."""
    import importlib
    import sys

    app_module = importlib.import_module("simsiam_kit.cli.app")

    calls = []
    monkeypatch.setattr(device, "measure_busy_cores", lambda seconds=0.5: calls.append(seconds) or 0.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "_THREADS", {})  # the choice main() makes stays in this test
    monkeypatch.setattr(sys, "argv", ["simsiam-kit", *argv])
    with pytest.raises(SystemExit):
        app_module.main()
    assert bool(calls) == sampled


def test_a_command_takes_the_idle_time_sample(monkeypatch):
    """A command (here one refused at once) chooses its threads from the sample first; the environment is restored
    by monkeypatch afterwards."""
    import importlib
    import sys

    app_module = importlib.import_module("simsiam_kit.cli.app")

    calls = []
    monkeypatch.setattr(device, "measure_busy_cores", lambda seconds=0.5: calls.append(seconds) or 0.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "_THREADS", {})  # the choice main() makes stays in this test
    monkeypatch.setattr(sys, "argv", ["simsiam-kit", "search", "--index", "/nonexistent", "--query", "/nonexistent"])
    with pytest.raises(SystemExit):
        app_module.main()
    assert calls == [0.5]
