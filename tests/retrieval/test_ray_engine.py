"""embed --engine ray (simsiam_kit/retrieval/ray_engine.py) on a local 2-CPU Ray runtime: the same shards as
the single-process pipeline, a killed actor retried with no row lost or duplicated, a clear line without Ray."""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from simsiam_kit.errors import UserError
from simsiam_kit.export.embedder import OnnxEmbedder
from simsiam_kit.retrieval.pipeline import embed_to_dir
from simsiam_kit.retrieval.shards import iter_shards

from helpers import conv_onnx_encoder, write_tiny_npz


def test_without_ray_the_option_names_the_extra(monkeypatch):
    from simsiam_kit.retrieval.ray_engine import RayEngine

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UserError, match=r"--engine ray needs Ray Data .*pip install -e '\.\[scale\]'"):
        RayEngine(lambda: None, "x.npz")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray runtime with 2 CPUs for the module (the engine joins it and leaves it running)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    enc = conv_onnx_encoder(root / "enc.onnx", size=16, dim=8)
    npz = write_tiny_npz(root / "tiny.npz", n=30, size=16)
    local = root / "local"
    embed_to_dir(OnnxEmbedder(enc, batch_size=4), str(npz), local, shard_size=8, workers=0, index_kind="none")
    return enc, npz, _shards(local)


def _shards(d: Path):
    return [(info.index, info.rows, z, table.to_pydict()) for info, z, table in iter_shards(d)]


def _same(got, want):
    assert [(i, r) for i, r, _, _ in got] == [(i, r) for i, r, _, _ in want]
    for (_, _, za, ta), (_, _, zb, tb) in zip(got, want):
        assert ta == tb  # rows, offsets, ids, labels, sizes: same order
        np.testing.assert_allclose(za, zb, rtol=0, atol=1e-6)


def test_ray_run_writes_the_single_process_shards(ray_local, inputs, tmp_path, recwarn):
    from simsiam_kit.retrieval.ray_engine import RayEngine

    enc, npz, want = inputs
    engine = RayEngine(functools.partial(OnnxEmbedder, enc, batch_size=4), str(npz), actors=2)
    out = tmp_path / "ray"
    m = embed_to_dir(OnnxEmbedder(enc, batch_size=4), str(npz), out, shard_size=8, engine=engine, index_kind="none")
    assert m["count"] == 30 and ray_local.is_initialized()  # joined, not shut down
    got = _shards(out)
    _same(got, want)
    assert sorted(r for _, _, _, t in got for r in t["row"]) == list(range(30))
    # map_batches called through its current API: no **ray_remote_args (deprecated in Ray 2.60, gone in 2.64)
    assert not [str(w.message) for w in recwarn if "ray_remote_args" in str(w.message)]


def test_single_process_workers_after_a_ray_run_in_the_same_process(ray_local, inputs, tmp_path):
    # forked DataLoader workers of a process with a Ray runtime up waited for ever on a lock a Ray thread held at
    # the fork (the benchmark's single-process run after its Ray runs); there the pipeline decodes in-process
    import threading

    from simsiam_kit.retrieval.pipeline import fork_is_unsafe
    from simsiam_kit.retrieval.ray_engine import RayEngine

    enc, npz, want = inputs
    engine = RayEngine(functools.partial(OnnxEmbedder, enc, batch_size=4), str(npz), actors=1)
    embed_to_dir(OnnxEmbedder(enc, batch_size=4), str(npz), tmp_path / "r", shard_size=8, engine=engine,
                 index_kind="none")  # fmt: skip
    assert ray_local.is_initialized() and fork_is_unsafe()
    done: dict = {}

    def run():
        done["m"] = embed_to_dir(OnnxEmbedder(enc, batch_size=4), str(npz), tmp_path / "w", shard_size=8, workers=2,
                                 index_kind="none")  # fmt: skip

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=180)
    assert not t.is_alive(), "the pipeline with 2 decoding workers did not finish within 180 s after a Ray run"
    assert done["m"]["count"] == 30
    _same(_shards(tmp_path / "w"), want)


def test_a_killed_actor_is_retried_and_no_row_is_lost_or_duplicated(ray_local, inputs, tmp_path):
    from simsiam_kit.retrieval.ray_engine import RayEngine

    enc, npz, want = inputs
    marker = tmp_path / "kill-once"
    marker.write_text("")

    class Dies(OnnxEmbedder):  # defined here: Ray pickles it by value into the actors
        def run(self, x):
            try:
                os.unlink(marker)  # the first batch anywhere: the actor's process is SIGKILLed mid-batch
            except FileNotFoundError:
                return super().run(x)
            os.kill(os.getpid(), signal.SIGKILL)

    engine = RayEngine(functools.partial(Dies, enc, batch_size=4), str(npz), actors=2)
    out = tmp_path / "killed"
    embed_to_dir(OnnxEmbedder(enc, batch_size=4), str(npz), out, shard_size=8, engine=engine, index_kind="none")
    assert not marker.exists()  # an actor did die
    got = _shards(out)
    _same(got, want)
    rows = [r for _, _, _, t in got for r in t["row"]]
    assert sorted(rows) == list(range(30)) and len(rows) == len(set(rows))


def test_embed_engine_option(inputs, tmp_path):
    from simsiam_kit.cli.embed import ray_engine
    from simsiam_kit.retrieval.ray_engine import RayEngine

    from helpers import cli

    enc, npz, _ = inputs
    args = ["embed", "--model", enc, "--data", npz, "--output", tmp_path / "e", "--no-progress"]
    for extra, msg in [
        (("--engine", "spark"), "--engine must be local or ray, got 'spark'"),
        (("--actors", "2"), "--ray-address / --actors apply to --engine ray"),
        (("--engine", "ray", "--runtime", "torch-bf16"), "--engine ray runs the --model file in onnxruntime"),
        (("--engine", "ray", "--runtime", "ort-int8"), "--runtime ort-int8: not available for enc.onnx"),
    ]:
        r = cli(*args, *extra)
        assert r.exit_code == 2 and msg in r.output, (extra, r.output)
    assert not (tmp_path / "e").exists()
    pytest.importorskip("ray")
    e = ray_engine(enc, str(npz), "auto", 64, "10.0.0.1:6379", 3)
    assert isinstance(e, RayEngine) and (e.address, e.actors) == ("10.0.0.1:6379", 3)
    assert e.open_embedder().dim == 8  # the actors' encoder: the command's model


def test_embed_command_with_engine_ray(ray_local, inputs, tmp_path):
    from helpers import cli

    enc, npz, want = inputs
    out = tmp_path / "cli"
    args = ["embed", "--model", enc, "--data", npz, "--output", out, "--shard-size", "8", "--batch-size", "4"]
    r = cli(*args, "--index", "none", "--no-progress", "--engine", "ray", "--actors", "2")
    assert r.exit_code == 0, r.output
    assert "Ray Data: 8 batches on 2 actor(s)" in r.output
    _same(_shards(out), want)
    r = cli(*args, "--engine", "local", "--actors", "2")
    assert r.exit_code == 2 and "--ray-address / --actors apply to --engine ray" in r.output


def test_each_actor_encodes_with_the_cpus_ray_reserves_for_it(inputs):
    # onnxruntime starts a thread per core unless told: in every actor of a full machine those threads spin
    # against each other. An actor opens its encoder with as many threads as CPUs it holds (here without Ray:
    # the actor class is what Ray Data instantiates).
    from simsiam_kit.retrieval.ray_engine import EncodeActor, actor_threads, takes_threads

    model, npz, _ = inputs
    data = str(npz)
    seen = []

    def opener(threads=None):
        seen.append(threads)
        return OnnxEmbedder(model, batch_size=4, threads=threads)

    assert actor_threads(1.0) == 1 and actor_threads(2.0) == 2 and actor_threads(0.5) == 1
    assert takes_threads(opener) and takes_threads(functools.partial(OnnxEmbedder, model, batch_size=4))
    assert not takes_threads(functools.partial(OnnxEmbedder, model, threads=2))  # the caller's choice stands
    assert not takes_threads(lambda: None)
    actor = EncodeActor(opener, data, False, None, 1)
    assert seen == [1]
    opts = actor.embedder.session.get_session_options()
    assert opts.intra_op_num_threads == 1
    out = actor({"shard": [0], "start": [0], "stop": [4]})
    assert len(out["payload"]) == 1
    EncodeActor(lambda: OnnxEmbedder(model, batch_size=4), data, False, None, 1)  # an opener without threads: as is
