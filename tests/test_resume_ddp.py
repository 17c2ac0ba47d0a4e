"""A killed run resumes to the same weights; a 2-process gloo DDP run through torchrun trains."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch

from conftest import REPO, tiny_overrides


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


def test_killed_run_resumes_to_identical_weights(tmp_path, tiny_npz):
    o = tiny_overrides(str(tiny_npz), None, epochs=3, batch=8) + ["train.deterministic=true", "train.knn_every=0"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(full, o), check=True, env=_env(), cwd=REPO, capture_output=True)

    # start the same run, SIGKILL it as soon as epoch 1's checkpoint is on disk
    p = subprocess.Popen(_cmd(killed, o), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if ck.is_file():
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "run finished before it could be killed"
    done = torch.load(ck, weights_only=True)["epoch"]
    assert 1 <= done < 3
    r = subprocess.run(_cmd(killed, o, ["--resume"]), env=_env(), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff == 0.0
    epochs = [json.loads(l)["epoch"] for l in (killed / "metrics.jsonl").read_text().splitlines()
              if '"type": "epoch"' in l]
    assert epochs == [1, 2, 3]  # no duplicated epoch lines after resuming


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_ddp_two_processes_gloo(tmp_path, tiny_npz):
    out = tmp_path / "ddp"
    o = tiny_overrides(str(tiny_npz), str(tiny_npz), epochs=1, batch=16)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "simsiam_kit", "pretrain", "--output", str(out)]
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
