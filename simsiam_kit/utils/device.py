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


def choose_threads(env=None, cores: int | None = None, load: float | None = None) -> dict:
    """The CPU thread count for this process: ``OMP_NUM_THREADS`` when set; otherwise the usable cores less
    those the 1-minute load average says other processes keep busy, at least 1.

    Why: PyTorch's OpenMP threads spin while they wait for each other, so on cores that other processes
    also want, a team of threads loses most of its time (the demo on 2 busy cores: 2-3 images/s with 2
    threads, 24 with 1; docs/benchmarks.md). Returns ``{"threads", "chosen_by", "usable_cores",
    "load_average", "busy"}``; ``busy``: the load average leaves less than one core idle."""
    env = os.environ if env is None else env
    cores = usable_cores() if cores is None else cores
    load = load_average() if load is None else load
    busy = load is not None and load > cores - 0.5
    raw = env.get("OMP_NUM_THREADS", "").strip()
    if raw:
        try:
            n = max(1, int(raw))
        except ValueError:
            raise UserError(f"OMP_NUM_THREADS={raw!r} is not a whole number") from None
        chosen_by = "OMP_NUM_THREADS"
    else:
        idle = cores - (load or 0.0)
        n = max(1, min(cores, int(idle + 0.5)))
        chosen_by = "auto"
    return {
        "threads": n,
        "chosen_by": chosen_by,
        "usable_cores": cores,
        "load_average": None if load is None else round(load, 2),
        "busy": bool(busy),
    }


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
