"""Device, precision and CPU thread selection. AMP is a value (an autocast context), never an if-branch
per step.

torch is imported inside the functions that need it: the command line chooses the CPU thread count
(:func:`choose_threads`) before torch is loaded, since OpenMP reads ``OMP_NUM_THREADS`` once, at load.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from simsiam_kit.config import PRECISIONS
from simsiam_kit.errors import UserError

if TYPE_CHECKING:
    import torch

# How the CPU thread count of this process was chosen (set by apply_thread_choice, read into run metadata).
_THREADS: dict = {}


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # pragma: no cover - non-Unix
        return None


def read_proc_stat(text: str | None = None) -> dict[int, tuple[int, int]] | None:
    """``{cpu: (busy jiffies, total jiffies)}`` for each ``cpuN`` line of ``/proc/stat`` (idle and iowait count as
    idle; guest time is already inside user/nice). None where the file cannot be read (non-Linux)."""
    if text is None:
        try:
            with open("/proc/stat", "rb") as f:
                text = f.read(1 << 20).decode("ascii", "replace")
        except OSError:
            return None
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            cpu = int(name[3:])
            v = [int(x) for x in rest.split()[:8]]
        except ValueError:
            continue
        if len(v) < 5:
            continue
        idle = v[3] + v[4]  # idle + iowait
        total = sum(v)
        out[cpu] = (total - idle, total)
    return out or None


def _own_cpu_jiffies() -> int:
    """CPU time of this process and its live children (DataLoader workers), in clock ticks."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    t = os.times()
    own = int((t.user + t.system) * ticks)
    me = str(os.getpid())
    try:
        for d in os.listdir("/proc"):
            if not d.isdigit() or d == me:
                continue
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    fields = f.read(4096).decode("ascii", "replace").rsplit(")", 1)[1].split()
            except OSError:
                continue
            if len(fields) > 12 and fields[1] == me:  # ppid
                own += int(fields[11]) + int(fields[12])  # utime + stime
    except OSError:  # pragma: no cover - no /proc
        pass
    return own


class CpuSampler:
    """How many of this process's usable cores OTHER processes kept busy since the last :meth:`sample`, from
    ``/proc/stat`` (the cores of the affinity mask only) less this process's own CPU time (and its children's).

    Unlike the 1-minute load average, which still reads above 1 for a minute after another job ended, this
    measures the interval itself: sampled over ~0.5 s at start, and over a whole epoch at each epoch boundary
    (free: two reads of /proc/stat)."""

    def __init__(self, cpus: set[int] | None = None, reader=read_proc_stat, own=_own_cpu_jiffies):
        try:
            self.cpus = set(os.sched_getaffinity(0)) if cpus is None else set(cpus)
        except (AttributeError, OSError):  # pragma: no cover
            self.cpus = set(range(os.cpu_count() or 1))
        self.reader, self.own = reader, own
        self.last = self._snapshot()

    def _snapshot(self):
        stat = self.reader()
        if stat is None:
            return None
        rows = [stat[c] for c in self.cpus if c in stat]
        if not rows:
            return None
        return sum(r[0] for r in rows), sum(r[1] for r in rows), self.own()

    def sample(self) -> float | None:
        """Cores kept busy by other processes since the previous call (or construction); None if unknown."""
        now = self._snapshot()
        prev, self.last = self.last, now
        if prev is None or now is None:
            return None
        busy, total, own = (a - b for a, b in zip(now, prev))
        if total <= 0:
            return None
        ncpu = len(self.cpus)
        other = max(0, busy - own)
        return round(min(float(ncpu), ncpu * other / total), 2)


def measure_busy_cores(seconds: float = 0.5) -> float | None:
    """Cores other processes keep busy now, measured over ``seconds`` (see :class:`CpuSampler`)."""
    import time

    s = CpuSampler()
    time.sleep(seconds)
    return s.sample()


def threads_for(cores: int, busy: float | None) -> int:
    """The auto rule: every usable core that other processes leave idle (rounded), at least 1."""
    return max(1, min(cores, int(cores - (busy or 0.0) + 0.5)))


def choose_threads(env=None, cores: int | None = None, load: float | None = None) -> dict:
    """The CPU thread count for this process: ``OMP_NUM_THREADS`` when set; otherwise the usable cores less
    those other processes keep busy (measured from ``/proc/stat`` over 0.5 s, :func:`measure_busy_cores`; the
    1-minute load average only where that cannot be read), at least 1. ``load`` replaces the measurement
    (tests).

    Why: PyTorch's OpenMP threads spin while they wait for each other, so on cores that other processes
    also want, a team of threads loses most of its time (docs/benchmarks.md). And why not the load average: it
    lags by a minute, so right after another job ends an idle machine still reads as busy. Returns
    ``{"threads", "chosen_by", "usable_cores", "busy_cores", "measured_by", "load_average", "busy"}``;
    ``busy``: other processes leave less than one core idle (under ``OMP_NUM_THREADS``, judged from the load
    average, which costs no sample)."""
    env = os.environ if env is None else env
    cores = usable_cores() if cores is None else cores
    raw = env.get("OMP_NUM_THREADS", "").strip()
    busy_cores: float | None
    if load is not None:
        busy_cores, measured_by = float(load), "given"
    elif raw:  # the user's count: nothing to sample for (0.5 s saved); the busy warning reads the load average
        busy_cores, measured_by = load_average(), "1-minute load average"
    else:
        busy_cores, measured_by = measure_busy_cores(), "/proc/stat over 0.5 s"
        if busy_cores is None:
            busy_cores, measured_by = load_average(), "1-minute load average"
    if raw:
        try:
            n = max(1, int(raw))
        except ValueError:
            raise UserError(f"OMP_NUM_THREADS={raw!r} is not a whole number") from None
        chosen_by = "OMP_NUM_THREADS"
    else:
        n = threads_for(cores, busy_cores)
        chosen_by = "auto"
    la = load_average() if load is None else load
    return {
        "threads": n,
        "chosen_by": chosen_by,
        "usable_cores": cores,
        "busy_cores": None if busy_cores is None else round(busy_cores, 2),
        "measured_by": measured_by,
        "load_average": None if la is None else round(la, 2),
        "busy": bool(busy_cores is not None and busy_cores > cores - 0.5),
    }


def recheck_threads(sampler: "CpuSampler", log=None) -> int | None:
    """At an epoch boundary: when the thread count was chosen automatically (not ``OMP_NUM_THREADS``), set
    torch's thread count from what other processes kept busy during the epoch (``sampler``), so a run that
    started during someone else's job speeds up when that job ends. Returns the new count when it changed."""
    if _THREADS.get("chosen_by") != "auto":
        return None
    busy = sampler.sample()
    if busy is None:
        return None
    import torch

    n = threads_for(int(_THREADS.get("usable_cores") or usable_cores()), busy)
    was = torch.get_num_threads()
    if n == was:
        return None
    torch.set_num_threads(n)
    _THREADS.update(
        threads=n,
        busy_cores=busy,
        measured_by="/proc/stat over the last epoch",
        busy=busy > _THREADS["usable_cores"] - 0.5,
    )
    if log is not None:
        log(
            f"CPU threads: {was} -> {n} (other processes kept {busy:g} of {_THREADS['usable_cores']} usable cores "
            "busy during the last epoch)"
        )
    return n


def apply_thread_choice(env=None) -> dict:
    """Choose the thread count (:func:`choose_threads`) and put it in ``OMP_NUM_THREADS`` before torch loads
    (the command line calls this first); remembered for :func:`thread_settings`."""
    env = os.environ if env is None else env
    choice = choose_threads(env)
    env["OMP_NUM_THREADS"] = str(choice["threads"])
    _THREADS.clear()
    _THREADS.update(choice)
    return choice


def thread_settings() -> dict:
    """What this process computes with on the CPU, for a run's metadata: torch's thread count and how it was
    chosen (``auto`` from the load, ``OMP_NUM_THREADS``, or ``torch default`` when the library is used
    without the command line)."""
    import torch

    out = (
        dict(_THREADS)
        if _THREADS
        else {
            "chosen_by": "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else "torch default",
            "usable_cores": usable_cores(),
        }
    )
    out["threads"] = torch.get_num_threads()
    return out


#: the CPU flags that decide which low-precision path is fastest (recorded with every benchmark figure and in
#: the key of every cached runtime choice): bf16 dot products on AVX512 (AMD EPYC, Intel Xeon since Cooper
#: Lake), AMX tiles for bf16 and int8 (Intel Xeon since Sapphire Rapids), int8 dot products on AVX512 (VNNI)
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni")


def cpu_facts(cpuinfo: str | None = None) -> dict:
    """``{"model": "AMD EPYC ...", "flags": {flag: bool for each of CPU_FLAGS}}`` from ``/proc/cpuinfo`` (the
    first processor's entry; ``cpuinfo`` replaces the file in tests); the model falls back to
    ``platform.processor()`` and the flags to False where the file cannot be read (non-Linux)."""
    import platform

    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", "rb") as f:
                cpuinfo = f.read(1 << 20).decode("utf-8", "replace")
        except OSError:  # pragma: no cover - non-Linux
            cpuinfo = ""
    model, flags = "", set[str]()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        if model and flags:
            break
    return {
        "model": model or platform.processor() or platform.machine(),
        "flags": {f: f in flags for f in CPU_FLAGS},
    }


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    import torch

    try:
        caps = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        caps = ""
    if "AVX512" not in str(caps).upper():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:  # pragma: no cover - non-Linux
        return False


def resolve_device(name: str = "auto") -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"bad device '{name}' (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available")
    return dev


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str

    @property
    def dtype(self):
        import torch

        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.name == "fp16" and self.device_type == "cuda"


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The one place precision names are checked: ``auto`` picks bf16 where the hardware has it."""
    if name not in PRECISIONS:
        raise UserError(f"unknown precision '{name}' (expected {', '.join(PRECISIONS)})")
    if name == "auto":
        if device.type == "cuda":
            import torch

            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "bf16" if cpu_supports_bf16() else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UserError("train.precision=fp16 is not supported on CPU (use bf16 or fp32)")
    return Precision(name, device.type)


def resolve_channels_last(flag, device: torch.device, precision: Precision) -> bool:
    if flag is None:
        return device.type == "cuda" or precision.name == "bf16" or cpu_supports_bf16()
    return bool(flag)


# ``train.compile=auto`` per device type, chosen by measurement (benchmarks/gpu_check.py on an H200,
# results in benchmarks/results/gpu_check.json; on the 2-core reference CPUs compiling costs minutes
# and the CPU path is not launch-bound).
COMPILE_AUTO = {"cuda": False, "cpu": False}


def resolve_compile(flag, device: torch.device) -> bool:
    if flag is None:
        return COMPILE_AUTO.get(device.type, False)
    return bool(flag)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): for wall-clock timing only."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def resolve_workers(flag, device: torch.device, local_processes: int = 1) -> int:
    """``data.workers``: an explicit number wins; auto = 2 on the CPU, on CUDA the usable cores split among
    the node's processes, one left for the training loop, between 2 and 16."""
    if flag is not None:
        if int(flag) < 0:
            raise UserError(f"data.workers must be >= 0 (or auto), got {flag}")
        return int(flag)
    if device.type != "cuda":
        return 2
    return max(2, min(16, usable_cores() // max(1, local_processes) - 1))
