"""Distributed helpers that also work without a process group (rank 0, world size 1).

Launch with ``torchrun --nproc_per_node N -m simsiam_kit.cli pretrain ...`` (or the
``simsiam-kit`` script). gloo is used on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from simsiam_kit.errors import UserError


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device_type: str, timeout_s: float | None = None) -> None:
    """Initialise the process group when started by torchrun; no-op otherwise.

    ``timeout_s`` (``train.dist_timeout_s``) bounds how long a collective waits for a peer that hangs
    without dying (a dead peer is torn down by torchrun within seconds); a rank that waits longer fails
    with an error instead of blocking the job forever. ``None``: torch's default."""
    if is_dist() or not launched_by_torchrun():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    kw: dict[str, Any] = {}
    if timeout_s is not None:
        from datetime import timedelta

        kw["timeout"] = timedelta(seconds=float(timeout_s))
    dist.init_process_group(backend=backend, **kw)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """Processes on this node (torchrun sets LOCAL_WORLD_SIZE), 1 without torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / get_world_size()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable, *args):
    """``fn(*args)`` run on rank 0, its outcome handed to every rank: a collective (every rank calls it; without
    a process group it is ``fn(*args)``). Every rank returns rank 0's result, or every rank raises: rank 0 its own
    exception; the others a :class:`UserError` of the same class and message when it was one (so the command
    ends with the same line everywhere), else a ``RuntimeError`` naming it. Rank 0 work followed by a barrier
    would leave the other ranks waiting there for a rank 0 that raised (until the process group's timeout)."""
    if not is_dist():
        return fn(*args)
    # ("ok", result, ""), ("user", the UserError's class, its message) or ("error", "", what was raised)
    outcome: tuple[str, Any, str] = ("ok", None, "")
    error: Optional[BaseException] = None
    if is_main():
        try:
            outcome = ("ok", fn(*args), "")
        except BaseException as exc:  # Ctrl-C included: the other ranks must not wait for a result
            error = exc
            user = isinstance(exc, UserError)
            outcome = ("user", type(exc), str(exc)) if user else ("error", "", f"{type(exc).__name__}: {exc}")
        try:  # what cannot be pickled would raise in the broadcast on rank 0 alone
            pickle.dumps(outcome)
        except Exception as exc:
            if outcome[0] == "user":
                outcome = ("user", UserError, outcome[2])
            else:
                outcome = ("error", "", f"its result cannot be sent to the other ranks ({type(exc).__name__}: {exc})")
    kind, value, text = broadcast_object(outcome)
    if error is not None:
        raise error
    if kind == "user":
        try:
            err = value(text)
        except Exception:  # a subclass that needs more than its message
            err = UserError(text)
        raise err
    if kind == "error":
        raise RuntimeError(f"rank 0 failed: {text}")
    return value


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on some rank."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
