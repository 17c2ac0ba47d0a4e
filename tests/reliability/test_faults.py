"""Fault injection: pretraining killed (SIGKILL) at random moments and inside checkpoint writes, interrupted
(SIGINT) inside a write, then resumed, ends with the same weights, bit for bit, as an uninterrupted run,
for in-memory data and for an ImageFolder read by 2 DataLoader workers; a DDP job (2 processes, gloo)
whose worker is killed tears down and leaves its run directory usable.

Kills inside writes go through a shim (``SHIM`` below) that runs the CLI with ``simsiam_kit.utils.io.atomic_write``
wrapped: on the n-th write of a named file it fires a signal at a chosen stage (``mid``: after 64 KiB of
the temp file; ``before_rename``: the temp file complete; ``after_rename``: the new file in place, e.g.
between ``backbone.pt`` and ``checkpoints/last.pt``). Nothing in the package knows about it.

After every kill the run directory is checked: every committed file loads, ``backbone.pt`` is never older
than the checkpoint, weights are finite. After every resume: no temp file is left.
The default suite runs one chain of each kind (a few tens of seconds); ``-m slow`` runs the loops whose
figures docs/reliability.md reports (set SIMSIAM_KIT_FAULT_REPORT=PATH to write them as JSON).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DATA, REPO, need, tiny_overrides

SHIM = r"""
import os, signal, sys
from pathlib import Path
from simsiam_kit.utils import io

sig, name, nth, stage = os.environ["SIMSIAM_KIT_TEST_FAULT"].split(":")
nth, count, orig = int(nth), [0], io.atomic_write

def fire():
    os.kill(os.getpid(), signal.SIGKILL if sig == "kill" else signal.SIGINT)

class Cut:
    def __init__(self, f):
        self.f, self.n, self.fired = f, 0, False
    def write(self, b):
        out = self.f.write(b)
        self.n += len(b)
        if self.n >= 65536 and not self.fired:
            self.fired = True
            fire()
        return out
    def __getattr__(self, k):
        return getattr(self.f, k)

def cut_write(path, write, mode):
    if Path(path).name != name:
        return orig(path, write, mode)
    count[0] += 1
    if count[0] != nth:
        return orig(path, write, mode)
    def w(f):
        if stage == "mid":
            write(Cut(f))
        else:
            write(f)
            if stage == "before_rename":
                fire()
    orig(path, w, mode)
    if stage == "after_rename":
        fire()

io.atomic_write = cut_write
from simsiam_kit.cli import main
sys.argv = ["simsiam-kit"] + sys.argv[1:]
main()
"""

COMPARE_KEYS = ("epoch", "step", "lr", "loss", "std", "knn_top1")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _args(out, overrides, extra=()):
    args = ["pretrain", "--output", str(out), *extra]
    for o in overrides:
        args += ["--set", o]
    return args


def _run(out, overrides, extra=(), fault=None, timeout=300):
    """Run the CLI to completion (or its death); ``fault`` = 'kill|int:FILENAME:N:STAGE'."""
    env = _env()
    if fault:
        env["SIMSIAM_KIT_TEST_FAULT"] = fault
        cmd = [sys.executable, "-c", SHIM, *_args(out, overrides, extra)]
    else:
        cmd = [sys.executable, "-m", "simsiam_kit", *_args(out, overrides, extra)]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _popen(out, overrides, extra=()):
    return subprocess.Popen(
        [sys.executable, "-m", "simsiam_kit", *_args(out, overrides, extra)],
        env=_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a) if a else 0.0


def _epoch_lines(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: r.get(k) for k in COMPARE_KEYS} for r in recs if r["type"] == "epoch"]


def _temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*.tmp")]


def check_after_kill(run: Path) -> dict:
    """What a killed run left: every committed file loads, the backbone is not older than the checkpoint.
    Returns {'epoch': checkpointed epochs, 'temp_bytes': bytes in temp files, 'lost_bytes': committed
    bytes that do not load (expected 0)}."""
    out = {"epoch": 0, "temp_bytes": sum(p.stat().st_size for p in _temp_files(run)), "lost_bytes": 0}
    ck, bb = run / "checkpoints" / "last.pt", run / "backbone.pt"
    loaded = {}
    for p in (ck, bb):
        if p.is_file():
            try:
                loaded[p.name] = torch.load(p, weights_only=True)
            except Exception:
                out["lost_bytes"] += p.stat().st_size
    if "last.pt" in loaded:
        out["epoch"] = loaded["last.pt"]["epoch"]
        assert all(torch.isfinite(v).all() for v in loaded["last.pt"]["model"].values() if v.is_floating_point())
        assert "backbone.pt" in loaded, "a checkpoint without its backbone"
        assert loaded["backbone.pt"]["epoch"] >= out["epoch"], "backbone.pt older than the checkpoint"
    assert out["lost_bytes"] == 0, out
    if (run / "metrics.jsonl").is_file():  # an epoch line is written after its checkpoint, never before
        assert all(r["epoch"] <= out["epoch"] for r in _epoch_lines(run)), (_epoch_lines(run), out)
    return out


def _resume(run: Path, overrides) -> subprocess.CompletedProcess:
    """Resume a killed run (or start it again when it was killed before its first checkpoint)."""
    if (run / "checkpoints" / "last.pt").is_file():
        return _run(run, overrides, ["--resume"])
    return _run(run, overrides, ["--overwrite"])


def _assert_same_run(ref: Path, run: Path) -> None:
    assert _max_diff(_weights(ref), _weights(run)) == 0.0
    assert _epoch_lines(ref) == _epoch_lines(run)  # each epoch once, same losses and kNN, no duplicates
    assert not _temp_files(run), _temp_files(run)
    assert (run / "results" / "pretrain.json").is_file()
    assert (
        torch.load(run / "backbone.pt", weights_only=True)["epoch"]
        == torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    )


# ---------------------------------------------------------------------------------------------
# data and reference runs


def _memory_overrides(npz: Path, epochs: int = 3) -> list[str]:
    return tiny_overrides(str(npz), str(npz), epochs=epochs, batch=8) + ["train.deterministic=true"]


def _folder_overrides(root: Path, epochs: int = 2) -> list[str]:
    return tiny_overrides(str(root), str(root), epochs=epochs, batch=8) + ["train.deterministic=true", "data.workers=2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def memory_npz(workdir):
    with np.load(need(DATA / "cifar10" / "val.npz")) as d:
        keep = np.flatnonzero(d["labels"] < 3)[:48]
        images = np.ascontiguousarray(d["images"][keep][:, 8:24, 8:24])
        labels = d["labels"][keep]
    p = workdir / "tiny.npz"
    np.savez(p, images=images, labels=labels, class_names=np.array(["airplane", "automobile", "bird"]))
    return p


@pytest.fixture(scope="module")
def image_folder(workdir):
    """An ImageFolder of 48 real CIFAR PNGs (3 classes x 16)."""
    src = need(DATA / "cifar10" / "imagefolder_sample" / "train")
    root = workdir / "folder"
    for c in ("airplane", "automobile", "bird"):
        (root / c).mkdir(parents=True)
        for f in sorted((src / c).iterdir())[:16]:
            shutil.copy(f, root / c / f.name)
    return root


@pytest.fixture(scope="module")
def memory_reference(workdir, memory_npz):
    ref = workdir / "ref-memory"
    r = _run(ref, _memory_overrides(memory_npz))
    assert r.returncode == 0, r.stderr[-2000:]
    return ref


@pytest.fixture(scope="module")
def folder_reference(workdir, image_folder):
    ref = workdir / "ref-folder"
    r = _run(ref, _folder_overrides(image_folder))
    assert r.returncode == 0, r.stderr[-2000:]
    return ref


# ---------------------------------------------------------------------------------------------
# the default suite: one chain of each kind


def test_kills_inside_checkpoint_writes_then_resume_is_bit_identical(workdir, memory_npz, memory_reference):
    """SIGKILL in the middle of writing last.pt, SIGKILL between backbone.pt and last.pt, SIGINT inside a
    write (exit 130, the write completes), then resumes: same weights and metrics as the uninterrupted run."""
    o = _memory_overrides(memory_npz)
    run = workdir / "chain-memory"
    # epoch 2's checkpoint is cut after 64 KiB: epoch 1's stays, a temp file is left behind
    r = _run(run, o, fault="kill:last.pt:2:mid")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    state = check_after_kill(run)
    assert state["epoch"] == 1 and state["temp_bytes"] >= 65536
    # resumed: the temp file is cleaned up; killed again after backbone.pt of epoch 2 is in place
    r = _run(run, o, ["--resume"], fault="kill:backbone.pt:1:after_rename")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert "removed 1 temp file" in r.stdout
    state = check_after_kill(run)
    assert state["epoch"] == 1 and state["temp_bytes"] == 0
    assert torch.load(run / "backbone.pt", weights_only=True)["epoch"] == 2  # newer than the checkpoint: allowed
    # resumed again: Ctrl-C while epoch 3's checkpoint is being written -> the write completes, exit 130
    r = _run(run, o, ["--resume"], fault="int:last.pt:2:mid")
    assert r.returncode == 130, (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in r.stderr
    state = check_after_kill(run)
    assert state["epoch"] == 3 and state["temp_bytes"] == 0
    # the checkpoint is the last one, but the run never wrote epoch 3's kNN/metrics line nor its summary
    r = _run(run, o, ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_run(memory_reference, run)
    r = _run(run, o, ["--resume"])
    assert r.returncode == 2 and "already finished" in r.stderr


def test_image_folder_two_workers_killed_at_random_then_resumed_is_bit_identical(
    workdir, image_folder, folder_reference
):
    o = _folder_overrides(image_folder)
    run = workdir / "chain-folder"
    p = _popen(run, o)
    ck = run / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not ck.is_file():
        time.sleep(0.01)
    time.sleep(random.Random(0).uniform(0.0, 0.5))  # somewhere in epoch 2 (or inside its checkpoint write)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "run finished before it could be killed"
    check_after_kill(run)
    r = _resume(run, o)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_run(folder_reference, run)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _workers(pid: int) -> list[int]:
    """The training processes torchrun ``pid`` started (its children running simsiam_kit)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return [c for c in out if b"simsiam_kit" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_ddp_worker_killed_tears_down(workdir, memory_npz):
    """2 gloo processes under torchrun; SIGKILL one worker mid-training: the job ends within seconds with an
    error, no process is left, the checkpoint (if any) loads and the directory's lock is free again."""
    out = workdir / "ddp-kill"
    o = tiny_overrides(str(memory_npz), None, epochs=200, batch=16) + ["train.dist_timeout_s=60"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "simsiam_kit",
        *_args(out, o),
    ]
    p = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ck = out / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not ck.is_file():
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read()[-3000:]
    workers = _workers(p.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.time()
    try:
        p.wait(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    teardown = time.time() - t0
    assert p.returncode != 0
    assert teardown < 60, teardown
    for w in workers:
        assert not Path(f"/proc/{w}").exists() or "Z" in Path(f"/proc/{w}/stat").read_text().split()[2]
    check_after_kill(out)
    with open(out / ".lock", "a") as f:  # the lock died with rank 0
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---------------------------------------------------------------------------------------------
# the long loops (-m slow): their figures are the ones docs/reliability.md states


def _report(name: str, figures: dict) -> None:
    print(f"\n{name}: {json.dumps(figures)}")
    path = os.environ.get("SIMSIAM_KIT_FAULT_REPORT")
    if path:
        p = Path(path)
        data = json.loads(p.read_text()) if p.is_file() else {}
        data[name] = figures
        p.write_text(json.dumps(data, indent=2) + "\n")


def _training_started(run: Path, since: float, p, timeout: float = 120) -> None:
    """Wait until this process has prepared its run directory (it writes or trims metrics.jsonl last)."""
    deadline = time.time() + timeout
    m = run / "metrics.jsonl"
    while time.time() < deadline and p.poll() is None:
        try:
            if m.stat().st_mtime >= since:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)


def _kill_loop(run: Path, overrides, kills: int, seed: int, window: tuple[float, float]) -> dict:
    """Start/resume the run and SIGKILL it, ``kills`` times, then let it finish: one kill in four at a random
    moment of the start-up, the others a random delay in ``window`` after training began."""
    rng = random.Random(seed)
    figures = {"kills": 0, "kills_before_first_checkpoint": 0, "temp_bytes_left_then_removed": 0, "lost_bytes": 0}
    for _ in range(kills):
        ck = run / "checkpoints" / "last.pt"
        extra = ["--resume"] if ck.is_file() else (["--overwrite"] if run.exists() else [])
        t0 = time.time()
        p = _popen(run, overrides, extra)
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.5, 4.0))
        else:
            _training_started(run, t0 - 0.01, p)
            time.sleep(rng.uniform(*window))
        if p.poll() is not None:  # finished (or failed) before the kill
            assert p.returncode == 0, p.stderr.read()[-2000:]
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        state = check_after_kill(run)
        figures["kills"] += 1
        figures["kills_before_first_checkpoint"] += int(state["epoch"] == 0)
        figures["temp_bytes_left_then_removed"] += state["temp_bytes"]
        figures["lost_bytes"] += state["lost_bytes"]
        if (run / "results" / "pretrain.json").is_file():
            break
    if not (run / "results" / "pretrain.json").is_file():
        r = _resume(run, overrides)
        assert r.returncode == 0, r.stderr[-2000:]
    return figures


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["memory", "folder"])
def test_random_kills_loop(kind, workdir, memory_npz, image_folder, memory_reference, folder_reference):
    if kind == "memory":
        o, ref, window = _memory_overrides(memory_npz, epochs=3), memory_reference, (0.0, 4.0)
    else:
        o, ref, window = _folder_overrides(image_folder, epochs=2), folder_reference, (0.0, 4.0)
    total = {
        "kills": 0,
        "kills_before_first_checkpoint": 0,
        "temp_bytes_left_then_removed": 0,
        "lost_bytes": 0,
        "resumed_runs_bit_identical": 0,
    }
    for rep in range(6):
        run = workdir / f"loop-{kind}-{rep}"
        figures = _kill_loop(run, o, kills=6, seed=100 * rep + (kind == "folder"), window=window)
        _assert_same_run(ref, run)
        for k, v in figures.items():
            total[k] += v
        total["resumed_runs_bit_identical"] += 1
    _report(f"random_kills_{kind}", total)
    assert total["lost_bytes"] == 0


@pytest.mark.slow
def test_kill_at_every_write_stage(workdir, memory_npz, memory_reference):
    """Every (file, occurrence, stage) of the run's atomic writes, killed once each, then resumed."""
    o = _memory_overrides(memory_npz)
    figures = {"kills": 0, "temp_bytes_left_then_removed": 0, "lost_bytes": 0, "resumed_runs_bit_identical": 0}
    for name, occurrences in (("last.pt", 3), ("backbone.pt", 3), ("metrics.jsonl", 1), ("config.yaml", 1)):
        for n in range(1, occurrences + 1):
            for stage in ("mid", "before_rename", "after_rename"):
                if stage == "mid" and name in ("metrics.jsonl", "config.yaml"):
                    continue  # smaller than the 64 KiB cut
                run = workdir / f"stage-{name}-{n}-{stage}"
                r = _run(run, o, fault=f"kill:{name}:{n}:{stage}")
                assert r.returncode == -signal.SIGKILL, (name, n, stage, r.stderr[-1500:])
                state = check_after_kill(run)
                figures["kills"] += 1
                figures["temp_bytes_left_then_removed"] += state["temp_bytes"]
                figures["lost_bytes"] += state["lost_bytes"]
                r = _resume(run, o)
                assert r.returncode == 0, (name, n, stage, r.stderr[-1500:])
                _assert_same_run(memory_reference, run)
                figures["resumed_runs_bit_identical"] += 1
    _report("kill_at_every_write_stage", figures)


@pytest.mark.slow
def test_ddp_killed_and_resumed_bit_identical(workdir, memory_npz):
    """2-process DDP killed (both processes) after its first checkpoint, resumed under DDP: same weights."""
    o = tiny_overrides(str(memory_npz), None, epochs=3, batch=16) + ["train.deterministic=true"]

    def torchrun(out, extra=()):
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "simsiam_kit",
            *_args(out, o, extra),
        ]

    ref, run = workdir / "ddp-ref", workdir / "ddp-killed"
    r = subprocess.run(torchrun(ref), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.Popen(
        torchrun(run),
        env=_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ck = run / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not ck.is_file():
        time.sleep(0.02)
    for w in _workers(p.pid):  # torchrun starts each worker in a session of its own
        os.kill(w, signal.SIGKILL)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    state = check_after_kill(run)
    assert state["epoch"] >= 1
    r = subprocess.run(torchrun(run, ["--resume"]), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _max_diff(_weights(ref), _weights(run)) == 0.0
    _report("ddp_kill_resume", {"kills": 1, "resumed_runs_bit_identical": 1, "lost_bytes": state["lost_bytes"]})


# ---------------------------------------------------------------------------------------------
# issue 24, part B: metrics.jsonl lines that are not records, on --resume


def test_resume_skips_metrics_lines_that_are_not_records_with_a_note(tiny_run, shared_tiny_npz, tmp_path):
    """``5``, ``[1, 2]``, ``{"type": "epoch"}`` and an epoch of the wrong type used to crash ``--resume`` with a
    traceback; they are dropped with one note naming the file and the first of them, the records are kept."""
    from helpers import cli

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    good = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('5\n[1, 2]\n{"type": "epoch"}\n{"type": "epoch", "epoch": "1", "step": 3}\n')
    r = cli("pretrain", "--output", run, "--resume", sets=["optim.epochs=2"])
    assert r.exit_code == 0, (r.output, repr(r.exception))
    assert (
        f"note: {run / 'metrics.jsonl'}: dropped 4 line(s) that are not metric records (line {len(good) + 1}: '5')"
        in (r.stdout)
    )
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[: len(good)] == good
    assert [x["epoch"] for x in lines if x["type"] == "epoch"] == [0, 1, 2]


SAVE_INDEX = r"""
import sys
import numpy as np
from simsiam_kit.errors import UserError
from simsiam_kit.retrieval.index import EmbeddingIndex

idx = EmbeddingIndex(16, backend=sys.argv[2])
idx.add(np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32))
try:
    idx.save(sys.argv[1])
except UserError as e:
    print(e)
    sys.exit(2)
"""


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_saving_an_index_on_a_full_disk_names_the_file(tmp_path, backend):
    """What ``eval knn --save-index`` writes (``index_vectors.npy`` or ``index.faiss``, 128 KB here) under a
    64 KB file-size limit: one line naming the file, nothing half-written left behind."""
    if backend == "faiss":
        pytest.importorskip("faiss")
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    out = tmp_path / "index"
    r = subprocess.run(
        [sys.executable, "-c", SAVE_INDEX, str(out), backend],
        env=_env(),
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    name = "index_vectors.npy" if backend == "torch" else "index.faiss"
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert r.stdout.startswith(f"cannot write {out / name}: File too large"), r.stdout
    assert r.stdout.count("\n") == 1 and "unchanged" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("schedule, identical", [("constant", True), ("cosine", False)])
def test_resume_set_more_epochs_equals_a_longer_run_only_without_cosine(workdir, memory_npz, schedule, identical):
    """What docs/reliability.md and the README say of ``--resume --set optim.epochs=N``: the cosine schedule is
    computed from the total number of epochs, so 1 epoch + 1 more is not a 2-epoch run (its first epoch had
    another learning rate); with a constant schedule it is, bit for bit."""
    over = _memory_overrides(memory_npz, epochs=2) + [f"optim.schedule={schedule}", "optim.warmup_epochs=0"]
    longer, resumed = workdir / f"two-{schedule}", workdir / f"one-plus-one-{schedule}"
    assert _run(longer, over).returncode == 0
    r = _run(resumed, over + ["optim.epochs=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _resume(resumed, ["optim.epochs=2"])
    assert r.returncode == 0, r.stderr[-2000:]
    diff = _max_diff(_weights(longer), _weights(resumed))
    assert (diff == 0.0) == identical, diff
