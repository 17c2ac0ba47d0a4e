"""Faults of the streaming embed (retrieval/pipeline.py + retrieval/shards.py): a real `embed` process SIGKILLed at
random moments then resumed gives the run an uninterrupted one gives, byte for byte; a truncated, tampered or deleted
shard is detected and redone; a second writer is refused; a full disk stops the run with one line and leaves every
finished shard valid."""

from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from simsiam_kit.errors import UserError
from simsiam_kit.export.embedder import OnnxEmbedder
from simsiam_kit.retrieval.pipeline import embed_to_dir
from simsiam_kit.retrieval.shards import MANIFEST_NAME, read_manifest

from helpers import DATA, REPO, conv_onnx_encoder, need

SHARD, BATCH, N = 4, 2, 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The encoder, a folder of 40 real COCO photos, and the directory of an uninterrupted run of it."""
    root = tmp_path_factory.mktemp("embed_faults")
    enc = conv_onnx_encoder(root / "conv.onnx", size=8, dim=8)
    photos = root / "photos"
    photos.mkdir()
    for f in sorted(need(DATA / "coco128_det" / "images").glob("*.jpg"))[:N]:
        shutil.copy(f, photos / f.name)
    ref = root / "ref"
    t0 = time.perf_counter()
    r = _embed(enc, photos, ref)
    assert r.returncode == 0, r.stderr[-2000:]
    return enc, photos, ref, time.perf_counter() - t0


def _cmd(enc, data, out):
    """A real `simsiam-kit embed` run, resuming whatever the directory holds (one decoding worker)."""
    args = ["--model", enc, "--data", data, "--output", out, "--shard-size", SHARD, "--batch-size", BATCH]
    args += ["--workers", 1, "--resume", "--no-progress"]
    return [sys.executable, "-m", "simsiam_kit", "embed", *map(str, args)]


def _file_size_limit(limit: int):
    """In the child: files may not grow past ``limit`` bytes (how a full disk looks to a writer)."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _embed(enc, data, out, fsize_limit=0):
    return subprocess.run(
        _cmd(enc, data, out),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit(fsize_limit) if fsize_limit else None,
    )


def _same_result(a: Path, b: Path) -> None:
    """Same shards (every file byte for byte), same search layout."""
    ma, mb = json.loads((a / MANIFEST_NAME).read_text()), json.loads((b / MANIFEST_NAME).read_text())
    assert ma["complete"] and mb["complete"]
    assert [(s["npy"], s["parquet"], s["rows"]) for s in ma["shards"]] == [
        (s["npy"], s["parquet"], s["rows"]) for s in mb["shards"]
    ]
    for s in ma["shards"]:
        for f in (s["npy"]["file"], s["parquet"]["file"]):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for f in ("embeddings.npy", "ids.json", "index.faiss", "index.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def _shards_done(out: Path) -> int:
    try:
        return len(json.loads((out / MANIFEST_NAME).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(setup, tmp_path):
    enc, photos, ref, ref_secs = setup
    out = tmp_path / "e"
    rng = random.Random(20261203)
    mid_run_kills, finished_dirs = 0, []
    for attempt in range(6):
        p = subprocess.Popen(_cmd(enc, photos, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt == 0:  # anywhere from start-up on
            time.sleep(rng.uniform(0.1, ref_secs))
        else:  # once this process has written a shard of its own: inside the shard loop or the finishing step
            before, t0 = _shards_done(out), time.time()
            while p.poll() is None and _shards_done(out) <= before and time.time() - t0 < 120:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.2))
        if p.poll() is not None:
            assert p.returncode == 0, p.stderr.read()[-2000:]
            if mid_run_kills:
                break  # finished before the kill
            shutil.rmtree(out)  # finished sooner than the reference run (the machine's load varies): start over
            continue
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        assert p.returncode == -signal.SIGKILL
        done = _shards_done(out)
        mid_run_kills += 0 < done < N // SHARD
        if done == N // SHARD and mid_run_kills == 0:  # killed in the finishing step: resume it aside, start over
            finished_dirs.append(out.with_name(f"finish{attempt}"))
            out.rename(finished_dirs[-1])
    assert mid_run_kills >= 1, "no kill landed between the first and the last shard"
    for d in [out, *finished_dirs]:
        r = _embed(enc, photos, d)  # resume to the end
        assert r.returncode == 0, r.stderr[-2000:]
        _same_result(ref, d)


@pytest.mark.parametrize("damage", ["truncate", "tamper", "delete"])
def test_damaged_or_deleted_shard_is_redone_on_resume(setup, tmp_path, damage):
    enc, photos, ref, _ = setup
    out = tmp_path / "e"
    shutil.copytree(ref, out)
    f = out / "shards" / "00003.npy"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-7])
    elif damage == "tamper":  # same size, one bit changed: only the sha256 can tell
        b = bytearray(f.read_bytes())
        b[-3] ^= 0x10
        f.write_bytes(bytes(b))
    else:
        f.unlink()
    logs = []
    embed_to_dir(
        OnnxEmbedder(enc, batch_size=BATCH), str(photos), out, shard_size=SHARD, workers=0, resume=True, log=logs.append
    )
    assert any("redoing a shard" in m and "00003.npy" in m for m in logs), logs
    assert any("1 shard(s) of 4 to write, 9 kept" in m for m in logs), logs
    _same_result(ref, out)


def test_second_writer_is_refused(setup, tmp_path):
    enc, photos, _, _ = setup
    out = tmp_path / "e"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from simsiam_kit.retrieval.shards import ShardWriter; "
            "w = ShardWriter(sys.argv[1], dim=8, shard_size=4); print('locked', flush=True); time.sleep(60)",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = _embed(enc, photos, out)
        assert r.returncode == 2
        line = r.stderr.strip().splitlines()[-1]
        assert f"{out}: another embedding run is writing to this directory (pid {holder.pid})" in line
        with pytest.raises(UserError, match="another embedding run"):
            embed_to_dir(OnnxEmbedder(enc), str(photos), out, shard_size=SHARD, workers=0, resume=True)
    finally:
        holder.kill()
        holder.wait()


def test_existing_run_needs_resume(setup, tmp_path):
    enc, photos, ref, _ = setup
    shutil.copytree(ref, tmp_path / "e")
    with pytest.raises(UserError, match="already holds embedding shards .* pass --resume"):
        embed_to_dir(OnnxEmbedder(enc, batch_size=BATCH), str(photos), tmp_path / "e", shard_size=SHARD, workers=0)
    with pytest.raises(UserError, match="--resume needs the same settings"):
        embed_to_dir(
            OnnxEmbedder(enc, batch_size=BATCH), str(photos), tmp_path / "e", shard_size=8, workers=0, resume=True
        )


def test_full_disk_stops_with_one_line_and_finished_shards_stay_valid(setup, tmp_path):
    enc, photos, ref, _ = setup
    out = tmp_path / "e"
    r = _embed(enc, photos, out, fsize_limit=3500)  # the manifest outgrows it after a few shards
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and "File too large" in lines[0], lines
    m = read_manifest(out)
    assert 0 < len(m["shards"]) < N // SHARD and not m["complete"]
    from simsiam_kit.retrieval.shards import iter_shards

    for info, z, _ in iter_shards(out):  # every listed shard verifies, and is the reference's
        assert np.array_equal(z, np.load(ref / info.npy["file"]))
    r = _embed(enc, photos, out)
    assert r.returncode == 0, r.stderr[-2000:]
    _same_result(ref, out)
