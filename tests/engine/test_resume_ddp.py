"""A 2-process gloo DDP run through torchrun trains. (Killed runs resuming to the same weights, in memory,
from an ImageFolder and under DDP: tests/test_faults.py.)"""

import os
import socket
import subprocess
import sys

import torch

from helpers import REPO, tiny_overrides


def _cmd(out, overrides, extra=()):
    args = [sys.executable, "-m", "simsiam_kit", "pretrain", "--output", str(out), *extra]
    for o in overrides:
        args += ["--set", o]
    return args


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _final_weights(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_ddp_two_processes_gloo(tmp_path, tiny_npz):
    out = tmp_path / "ddp"
    o = tiny_overrides(str(tiny_npz), str(tiny_npz), epochs=1, batch=16)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "simsiam_kit",
        "pretrain",
        "--output",
        str(out),
    ]
    for x in o:
        cmd += ["--set", x]
    r = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 processes" in r.stdout
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and isinstance(ck["rng"], list) and len(ck["rng"]) == 2
    assert not any(k.startswith("module.") for k in ck["model"])
    # SyncBN was used and the rank-0 checkpoint is a plain (unwrapped) state dict
    assert "backbone.bn1.running_mean" in ck["model"]
    assert len(list((out / "checkpoints").iterdir())) == 1


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    """train.dist_timeout_s bounds how long a collective waits for a hung (not dead) peer."""
    from datetime import timedelta

    import torch.distributed as tdist

    from simsiam_kit.utils import dist

    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(tdist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    dist.init_from_env("cpu", 42.0)
    assert seen == {"backend": "gloo", "timeout": timedelta(seconds=42)}
