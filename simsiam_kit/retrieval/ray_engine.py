"""``simsiam-kit embed --engine ray``: the embed pipeline on Ray Data, from one machine to a cluster.

The same pipeline as :mod:`simsiam_kit.retrieval.pipeline`, with its read-decode-encode stage run by Ray::

    read   ray.data.from_items(the batches still to embed: shard, first row, last row)
      -> map_batches(EncodeActor, ActorPoolStrategy(size=actors))   # each actor: one encoder session;
                                                                     # reads, decodes, preprocesses, encodes
      -> this process: batches grouped into shards, written by the same ShardWriter + manifest

so a Ray run writes the shards a single-process run writes: the batches are the same row ranges
(:func:`~simsiam_kit.retrieval.pipeline.batch_ranges`), each encoded by the same embedder code, and
shards are assembled from batches sorted by their first row, whatever order Ray returns them in. Each
actor's onnxruntime session runs as many threads as the CPUs Ray reserves for the actor (1 by default,
:func:`actor_threads`), not one per core of the machine: a machine full of actors then runs one thread per core.

**Runtime.** A local Ray runtime is started (and shut down at the end) unless ``address`` (or the
``RAY_ADDRESS`` environment variable) names a running cluster to join (``ray start --head`` on one
machine, ``ray start --address HEAD:6379`` on the others; every machine must see the model file and
the data at the same paths; each actor works in the command's working directory when that exists on its
machine, so relative paths mean what they mean to the command). The writer stays in this process: the
output directory needs to be on this machine only.

**Faults.** Actors are created with unlimited restarts and task retries: a killed actor process is
restarted by Ray and its batch recomputed. This process keeps one result per batch (keyed by its first
row, a recomputed duplicate is dropped) and checks that every batch came back, so no row is lost or
written twice; a shard is written only once all its batches are in.

``ray[data]`` is the optional extra ``scale`` (``pip install -e ".[scale]"``); without it, ``--engine
ray`` says so in one line.
"""

from __future__ import annotations

import os
import pickle
from typing import Callable, Iterator, Optional

import numpy as np

from simsiam_kit.errors import UserError

ENGINES = ("local", "ray")


def require_ray():
    """``ray`` with Ray Data, or a :class:`UserError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"--engine ray needs Ray Data ({e}); install it with: pip install -e '.[scale]' "
            "(or pip install 'ray[data]')"
        ) from None
    return ray


class EncodeActor:
    """One Ray actor of the pool: opens the input and one encoder session once, then reads, decodes,
    preprocesses and encodes each batch it is given (``shard``, ``start``, ``stop`` columns)."""

    def __init__(
        self,
        open_embedder: Callable,
        data: str,
        skip_bad: bool,
        cwd: Optional[str] = None,
        threads: Optional[int] = None,
    ):
        from simsiam_kit.retrieval.pipeline import open_source, stages

        if cwd and os.path.isdir(cwd):  # relative paths in the spec (and in path lists) as the command saw them
            os.chdir(cwd)
        self.embedder = open_embedder(**({"threads": threads} if threads and takes_threads(open_embedder) else {}))
        self.source = open_source(data, skip_bad)
        self.preprocess, self.encode = stages(self.embedder)
        self.skip_bad = skip_bad

    def __call__(self, batch: dict) -> dict:
        from simsiam_kit.retrieval.pipeline import _as_numpy, make_batch

        out = []
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"]):
            try:
                b = make_batch(self.source, self.preprocess, int(shard), int(start), int(stop), self.skip_bad)
            except UserError as e:  # a bad tar label, a missing file: one line in the driver
                b = {"error": str(e), "remedy": getattr(e, "remedy", None)}
            if "error" not in b:
                x = _as_numpy(b.pop("x"))
                b["z"] = self.encode(x) if x is not None else np.zeros((0, self.embedder.dim), np.float32)
            b.update(shard=int(shard), start=int(start), stop=int(stop))
            out.append(pickle.dumps(b, protocol=pickle.HIGHEST_PROTOCOL))
        return {"start": np.asarray(batch["start"], np.int64), "payload": np.array(out, dtype=object)}


def takes_threads(fn: Callable) -> bool:
    """Whether the encoder opener accepts ``threads`` (and was not given it already)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    given = getattr(fn, "keywords", None) or {}
    return "threads" in params and "threads" not in given


def actor_threads(cpus_per_actor: float) -> int:
    """Encoder threads of one actor: the CPUs Ray reserves for it (at least 1). onnxruntime would otherwise
    start a thread per core in every actor, and on a machine full of actors those threads spin against each
    other (Ray sets ``OMP_NUM_THREADS`` this way for its workers; onnxruntime does not read it)."""
    return max(1, int(cpus_per_actor))


class RayEngine:
    """The ``engine`` of :func:`simsiam_kit.retrieval.pipeline.embed_to_shards` on Ray Data (see the module
    docstring). ``open_embedder()``: a picklable callable that opens the encoder (called once per actor);
    ``actors``: the size of the actor pool (default: the cluster's CPUs); ``num_cpus``: CPUs of a local
    runtime (default: all); ``cpus_per_actor``: CPUs Ray reserves for each actor."""

    def __init__(
        self,
        open_embedder: Callable,
        data: str,
        address: Optional[str] = None,
        actors: Optional[int] = None,
        num_cpus: Optional[int] = None,
        cpus_per_actor: float = 1.0,
        log: Optional[Callable[[str], None]] = None,
    ):
        if actors is not None and actors < 1:
            raise UserError(f"--actors must be >= 1 (got {actors})")
        self.open_embedder, self.data = open_embedder, data
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.actors, self.num_cpus, self.cpus_per_actor = actors, num_cpus, cpus_per_actor
        self.say = log or (lambda s: None)
        self.ray = require_ray()

    def start(self) -> bool:
        """Connect to the cluster or start a local runtime; True when this call started it."""
        ray = self.ray
        if ray.is_initialized():
            return False
        kw = dict(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        if self.address:
            try:
                ray.init(address=self.address, **kw)
            except Exception as e:  # ConnectionError, ValueError, RuntimeError depending on the failure
                raise UserError(f"--ray-address {self.address}: cannot join the Ray cluster ({str(e)[:200]})") from None
            self.say(f"joined the Ray cluster at {self.address}")
        else:
            ray.init(num_cpus=self.num_cpus, **kw)
            self.say(f"started a local Ray runtime ({int(ray.cluster_resources().get('CPU', 0))} CPUs)")
        return True

    def __call__(self, source, todo, shard_size: int, total: int, batch_size: int, skip_bad: bool) -> Iterator[dict]:
        from simsiam_kit.retrieval.pipeline import batch_ranges

        ray = self.ray
        started = self.start()
        try:
            ranges = batch_ranges(todo, shard_size, total, batch_size)
            items = [{"shard": s, "start": a, "stop": b} for s, a, b in ranges]
            if not items:
                return
            import logging

            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # the pipeline has its own
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            cpus = int(ray.cluster_resources().get("CPU", 1))
            size = self.actors or max(1, int(cpus // self.cpus_per_actor))
            self.say(f"Ray Data: {len(items)} batches on {size} actor(s)")
            ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * size))
            ds = ds.map_batches(
                EncodeActor,
                fn_constructor_args=(
                    self.open_embedder,
                    self.data,
                    skip_bad,
                    os.getcwd(),
                    actor_threads(self.cpus_per_actor),
                ),
                batch_size=1,  # one pipeline batch (batch_size images) per call
                compute=ray.data.ActorPoolStrategy(size=size),
                num_cpus=self.cpus_per_actor,
                # no **ray_remote_args (deprecated in Ray 2.60, removed in 2.64): Ray Data creates an actor pool's
                # actors with max_restarts=-1 and max_task_retries=-1 by default (a killed actor is restarted and
                # its batch recomputed; tests/retrieval/test_ray_engine.py kills one)
            )
            seen: set = set()
            for row in ds.iter_rows():
                start = int(row["start"])
                if start in seen:  # a batch recomputed after a failure that had already come back
                    continue
                seen.add(start)
                yield pickle.loads(row["payload"])
            missing = [it["start"] for it in items if it["start"] not in seen]
            if missing:
                raise RuntimeError(f"Ray returned no result for the batches starting at rows {missing[:5]}")
        finally:
            if started:
                ray.shutdown()
