"""Streaming, sharded, resumable embedding: ``simsiam-kit embed`` on a collection of any size.

::

    from simsiam_kit.export import OnnxEmbedder
    from simsiam_kit.retrieval.pipeline import embed_to_dir
    embed_to_dir(OnnxEmbedder("encoder.onnx"), "shards/{00000..00099}.tar", "emb/", shard_size=10_000,
                 workers=8, resume=True)

The stages:

1. **Read and decode** in DataLoader worker processes (``workers``; 0 = in this process; None = chosen by
   :func:`choose_workers` from the time one batch takes to decode): each worker
   takes every ``workers``-th batch of the rows still to embed, reads its images (a file, an array row or
   a tar member, :mod:`simsiam_kit.data.webdataset`), decodes them and applies the model's own
   preprocessing (``embedder.preprocess``: for an ONNX model the rule of its metadata, the very function
   ``OnnxEmbedder.embed`` calls), so decoding overlaps the encoder.
2. **Encode** in this process (``embedder.run``: onnxruntime on the CPU or CUDA, or the torch backbone),
   then l2-normalise.
3. **Write** each shard of ``shard_size`` input rows as soon as its last batch is encoded, atomically,
   with :class:`simsiam_kit.retrieval.shards.ShardWriter` (the format is documented there), in a writer thread
   while the encoder goes on with the next shard (checksums, file writes and fsync release the GIL).
4. **Finish** (``index != "none"``): the directory layout ``search`` reads, streamed from the verified
   shards: ``embeddings.npy`` (float32), ``ids.json``, ``labels.npy`` (when every image is labelled), the
   index and ``embed.json`` (see :mod:`simsiam_kit.retrieval.embed_search`).

**Batches are fixed by the rows**, not by the workers: shard ``i``'s rows are cut into batches of
``batch_size`` from its first row, so the encoder sees the same batches for any number of workers and in
a resumed run. A run killed at any moment and resumed (``resume=True``) therefore writes the same shards,
byte for byte, as an uninterrupted one on the same machine: finished shards are kept (after their sha256
is checked), the others are embedded again.

**Memory** does not grow with the number of images while shards are written: the rows of the shard
being filled and of the one being written meanwhile by the writer thread (each ``shard_size x dim`` float32
embeddings and their ids, plus the bytes of its two files while they are written) plus the batches in flight
(``workers x prefetch x batch_size`` preprocessed images of ``3 x S x S`` float32) plus the encoder, plus
what the input keeps per item (nothing for tar shards beyond one count per tar; the file list of an
ImageFolder or path list; the arrays of an npz). The finishing step streams the shards into
``embeddings.npy`` and ``ids.json`` one shard at a time; the index it builds in RAM holds every vector
(``N x dim x 4`` bytes for ``flat``), which ``index="none"`` skips (shards only, for ``index build``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from simsiam_kit.errors import UserError
from simsiam_kit.retrieval.shards import ShardWriter, iter_shards, num_shards, shard_lock, shard_range
from simsiam_kit.utils.io import file_sha256
from simsiam_kit.utils.vectors import l2_normalize

DEFAULT_SHARD_SIZE = 10_000
PREFETCH = 2  # batches each worker prepares ahead
MANIFEST = "embed.json"  # the finished directory's manifest (embed_search.MANIFEST)
SKIPPED_LISTED = 1000  # embed.json lists at most this many skipped images (manifest.json lists all)
#: what ``embed`` (and ``index build``, ``search``) write in an embedding directory: ``embed --overwrite``
#: removes these, under the directory's lock, and nothing else (``search-N.png`` pictures too)
EMBED_FILES = (
    MANIFEST,
    "manifest.json",
    "shards",
    "embeddings.npy",
    "ids.json",
    "labels.npy",
    "index.json",
    "index.faiss",
    "index_vectors.npy",
    "index.ivfdata",
    "search.json",
    "search.png",
)


def clear_embedding_dir(out: Path) -> None:
    """Remove what an earlier embed wrote in ``out`` (:data:`EMBED_FILES` and its search pictures); the
    caller holds the directory's lock."""
    import shutil

    names = [*EMBED_FILES, *(p.name for p in out.glob("search-*.png"))]
    for name in names:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


# ------------------------------------------------------------------------------------------ sources
class RowSource:
    """The input as numbered rows: ``len``, ``name``, ``classes`` and ``read(start, stop)`` yielding
    ``(row, id, label, image)`` where ``image`` is a decoded image (PIL or uint8 array) or the
    :class:`UserError` that decoding raised."""

    name: str
    classes: Optional[list] = None

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> Iterator[tuple]:
        raise NotImplementedError

    @property
    def damaged(self) -> list:
        return []


class DatasetSource(RowSource):
    """An :class:`~simsiam_kit.data.datasets.ImageDataset` (npz, ImageFolder, path list, torchvision, demo)."""

    def __init__(self, ds):
        self.ds, self.name, self.classes = ds, ds.name, ds.classes
        ds.skip_bad_images = False  # errors come back as values; the pipeline decides

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, start: int, stop: int):
        ds = self.ds
        for i in range(start, stop):
            ident = ds.ids[i]
            try:
                img = ds.images[i] if ds.in_memory else ds.load_pil(i)
            except UserError as e:
                img = e
            yield i, ident, int(ds.labels[i]), img


class TarSource(RowSource):
    """WebDataset tar shards (:class:`simsiam_kit.data.webdataset.TarShards`), optionally a row slice."""

    def __init__(self, spec: str, sl: Optional[slice], skip_bad: bool):
        from simsiam_kit.data.webdataset import TarShards

        self.shards = TarShards(spec, skip_bad=skip_bad)
        self.lo, self.hi, _ = (sl or slice(None)).indices(len(self.shards))
        self.hi = max(self.lo, self.hi)
        self.name = spec + (f"[{sl.start or ''}:{sl.stop or ''}]" if sl else "")
        if len(self) == 0:
            raise UserError(f"dataset '{self.name}' is empty")

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def damaged(self) -> list:
        return self.shards.damaged

    def read(self, start: int, stop: int):
        from simsiam_kit.data.webdataset import decode_image

        for row, ident, label, data in self.shards.read(self.lo + start, self.lo + stop):
            try:
                img = decode_image(data, ident)
            except UserError as e:
                img = e
            yield row - self.lo, ident, label, img


def open_source(spec: str, skip_bad_images: bool = False) -> RowSource:
    """The rows of a dataset spec (every spec of :func:`simsiam_kit.data.datasets.load_dataset`, and tar shards)."""
    from simsiam_kit.data.datasets import check_spec, load_dataset, parse_spec

    kind, _ = check_spec(spec)
    if kind == "tar":
        base, sl = parse_spec(str(spec))
        return TarSource(base, sl, skip_bad_images)
    return DatasetSource(load_dataset(spec, skip_bad_images=skip_bad_images))


# ------------------------------------------------------------------------------------------ batches
def batch_ranges(todo: list[int], shard_size: int, total: int, batch_size: int) -> Iterator[tuple[int, int, int]]:
    """``(shard, start, stop)`` of every batch of the shards ``todo``, in order: each shard cut from its
    first row (the same batches whatever the workers or the resume point)."""
    for i in todo:
        a, b = shard_range(i, shard_size, total)
        for s in range(a, b, batch_size):
            yield i, s, min(s + batch_size, b)


def _image_size(img) -> tuple[int, int]:
    if isinstance(img, np.ndarray):
        return int(img.shape[1]), int(img.shape[0])
    return int(img.size[0]), int(img.size[1])


def make_batch(source: RowSource, preprocess: Callable, shard: int, start: int, stop: int, skip_bad: bool) -> dict:
    """Read, decode and preprocess rows ``[start, stop)``: what a worker hands to the encoder."""
    imgs, rows, ids, labels, widths, heights, skipped = [], [], [], [], [], [], []
    for row, ident, label, img in source.read(start, stop):
        if isinstance(img, Exception):
            if not skip_bad:
                return {"error": str(img), "remedy": getattr(img, "remedy", None)}
            skipped.append({"row": int(row), "id": str(ident), "error": str(img)[:300]})
            continue
        w, h = _image_size(img)
        imgs.append(img)
        rows.append(row)
        ids.append(ident)
        labels.append(label)
        widths.append(w)
        heights.append(h)
    x = preprocess(imgs) if imgs else None
    return {
        "shard": shard,
        "start": start,
        "stop": stop,
        "x": x,
        "row": np.asarray(rows, np.int64),
        "id": ids,
        "label": np.asarray(labels, np.int64),
        "width": np.asarray(widths, np.int32),
        "height": np.asarray(heights, np.int32),
        "skipped": skipped,
    }


def batch_error(batch: dict) -> UserError:
    """The error a worker reported, raised here as one line; an unreadable image keeps its ``remedy``."""
    from simsiam_kit.data.datasets import UnreadableImage

    cls = UnreadableImage if batch.get("remedy") == UnreadableImage.remedy else UserError
    return cls(batch["error"])


def _torch_dataset(source, preprocess, todo, shard_size, total, batch_size, skip_bad):
    import torch

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            w, n = (info.id, info.num_workers) if info is not None else (0, 1)
            for k, (shard, a, b) in enumerate(batch_ranges(todo, shard_size, total, batch_size)):
                if k % n == w:
                    try:
                        yield make_batch(source, preprocess, shard, a, b, skip_bad)
                    except UserError as e:  # a bad tar label, a missing file: one line in the main process
                        yield {"error": str(e), "remedy": getattr(e, "remedy", None)}

    return Batches()


def iter_batches(
    source, preprocess, todo, shard_size, total, batch_size, skip_bad, workers: int, pin_memory: bool = False
) -> Iterator[dict]:
    """The batches of :func:`batch_ranges`, in that order, prepared by ``workers`` DataLoader workers
    (``pin_memory``: in page-locked memory, for an encoder on CUDA)."""
    if workers <= 0 or fork_is_unsafe():
        for shard, a, b in batch_ranges(todo, shard_size, total, batch_size):
            yield make_batch(source, preprocess, shard, a, b, skip_bad)
        return
    import torch

    loader = torch.utils.data.DataLoader(
        _torch_dataset(source, preprocess, todo, shard_size, total, batch_size, skip_bad),
        batch_size=None,  # a worker's dict is the batch (no collation)
        num_workers=workers,
        prefetch_factor=PREFETCH,
        pin_memory=pin_memory,
    )
    # Forking with garbage about: a dead onnxruntime session (an earlier run's embedder, freed only by the cycle
    # collector) collected inside a forked worker runs its destructor there, which waits on a condition variable of
    # threads the fork did not copy, for ever (seen: a second embed in one process hung in its first worker). So the
    # garbage is collected here, and what exists at the fork is frozen, never collected in the workers.
    gc.collect()
    gc.freeze()
    try:
        batches = iter(loader)  # forks the workers
    finally:
        gc.unfreeze()  # in this process only: the workers keep their copy frozen
    # with every worker yielding every n-th batch, the loader's round robin returns them in batch order
    yield from batches


def fork_is_unsafe() -> bool:
    """Whether forked decoding workers could hang: in a process where a Ray runtime is up, whose threads (gRPC,
    the core worker) may hold locks at the moment of a fork, a forked worker waits on them for ever (seen: the
    single-process pipeline run after a Ray run in one process hung in its first worker). There the pipeline
    decodes in its own process instead (``workers`` 0): slower, never stuck. (Started workers that do not
    fork, ``forkserver``/``spawn``, would need the embedder pickled, and an onnxruntime session is not.)"""
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


def _as_numpy(x):
    if x is None or isinstance(x, np.ndarray):
        return x
    if isinstance(x, list):
        return [_as_numpy(v) for v in x]
    return x.numpy() if hasattr(x, "numpy") else x


def keep_images(images: list) -> list:
    """The preprocessing of an embedder without ``preprocess``/``run``: the decoded images go to its ``embed``."""
    return images


def stages(embedder) -> tuple[Callable, Callable]:
    """``(preprocess, encode)``: the worker's and the encoder's halves of ``embedder``. An embedder with
    ``preprocess`` and ``run`` (``OnnxEmbedder``, the torch runtime) is split there; any other is given the
    decoded images (its ``embed`` returns l2-normalised rows)."""
    if callable(getattr(embedder, "preprocess", None)) and callable(getattr(embedder, "run", None)):
        return embedder.preprocess, lambda x: encode(embedder, x)
    return keep_images, lambda x: np.asarray(embedder.embed(x), np.float32)


def encode(embedder, x: np.ndarray) -> np.ndarray:
    """l2-normalised embeddings of a preprocessed batch, in chunks the embedder accepts."""
    step = int(getattr(embedder, "chunk", len(x)) or len(x))
    outs = [np.asarray(embedder.run(x[s : s + step]), np.float32) for s in range(0, len(x), step)]
    return l2_normalize(np.concatenate(outs))


def default_workers() -> int:
    """Decoding workers sized to the cores: all but one (the encoder's), at least 0."""
    from simsiam_kit.utils.device import usable_cores

    return max(0, min(usable_cores() - 1, 16))


#: decoding a batch faster than this (seconds, measured in this process) stays in this process: handing a batch
#: over from a worker costs about 10 ms here, and a decoding process takes cores from the encoder. Measured on 2
#: cores of an AMD EPYC (benchmarks/embed_pipeline.py, ResNet-18 ONNX, batches of 64): 32 px CIFAR JPEGs (16 ms a
#: batch to decode) ran at 90 % of the two-stage bound in-process and 67 % with one worker; 640 x 480 photos
#: resized to 224 px (540 ms a batch) at 83 % in-process and 94 % with one worker
WORKER_MIN_BATCH_DECODE_S = 0.1


def choose_workers(images: list, read_seconds: float, preprocess: Callable, batch_size: int):
    """``(workers, why)`` for ``workers=None``: none (decoding in this process) when reading, decoding and
    preprocessing one batch takes less than :data:`WORKER_MIN_BATCH_DECODE_S`, else :func:`default_workers` (the
    cores but one). Timed on what ``embed`` decodes first anyway (``images``, read in ``read_seconds``: the
    runtime's timing batch or the scale warning's rows, :func:`first_images`) plus their preprocessing here, scaled
    to ``batch_size``: the choice decodes no image of its own."""
    most = default_workers()
    if most == 0:
        return 0, "one usable core"
    if not images:
        return most, "no readable image to time"
    t0 = time.perf_counter()
    try:
        preprocess(images)
    except Exception:  # the run reports what is wrong with the input; the probe only times it
        return most, "the first images could not be preprocessed"
    per_batch = (read_seconds + time.perf_counter() - t0) / len(images) * batch_size
    if per_batch < WORKER_MIN_BATCH_DECODE_S:
        return 0, f"decoding a batch takes {per_batch * 1000:.0f} ms here: faster in this process than handed over"
    return most, f"decoding a batch takes {per_batch * 1000:.0f} ms here: overlapped with the encoder"


def _shorter_side(im) -> int:
    """The shorter side in pixels of a decoded image (PIL: ``size``; an array: ``shape`` H, W[, C]), 0 if unknown."""
    shape = getattr(im, "shape", None)
    if shape is not None and len(shape) >= 2:
        return int(min(shape[0], shape[1]))
    size = getattr(im, "size", None)
    return int(min(size)) if isinstance(size, tuple) and len(size) == 2 else 0


def first_images(source: RowSource, n: int, limit: int) -> list:
    """Up to ``n`` decoded images from the first ``limit`` rows (unreadable ones passed over): the batch an
    embedder that picks its runtime by timing (``choose``) is timed on."""
    out = []
    for _, _, _, img in source.read(0, min(limit, len(source))):
        if not isinstance(img, Exception):
            out.append(img)
            if len(out) == n:
                break
    return out


def _recorded_runtime(out: Path) -> Optional[str]:
    """The runtime in the fingerprint of the shards already in ``out`` (None when there are none)."""
    from simsiam_kit.retrieval.shards import read_manifest

    try:
        m = read_manifest(out)
    except UserError:
        return None  # the writer reports it
    return m["fingerprint"].get("runtime") if m else None


# ------------------------------------------------------------------------------------------ embed


def fingerprint_of(embedder, source: RowSource, data: str, batch_size: int) -> dict:
    """What must match for ``--resume`` to continue a run (a shard depends on all of it)."""
    meta = embedder.meta
    return {
        "model_sha256": file_sha256(Path(embedder.path)),
        "runtime": getattr(embedder, "runtime", "onnxruntime"),
        "data": str(data),
        "rows": len(source),
        "batch_size": int(batch_size),
        "image_size": meta.get("image_size"),
        "mean": list(meta.get("mean") or []),
        "std": list(meta.get("std") or []),
    }


def embed_to_shards(
    embedder,
    data: str,
    output,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: str = "float32",
    resume: bool = False,
    skip_bad_images: bool = False,
    workers: Optional[int] = None,
    batch_size: Optional[int] = None,
    progress: bool = False,
    log=None,
    source: Optional[RowSource] = None,
    on_complete: Optional[Callable[[dict], None]] = None,
    engine: Optional[Callable] = None,
    overwrite: bool = False,
) -> dict:
    """Embed ``data`` into shards under ``output`` (see the module docstring); return a summary
    (rows, inputs, skipped, seconds, images/s, shards written and kept). ``on_complete(summary)`` runs once
    every shard is written, while the directory's lock is still held (the finishing step). ``engine(source,
    todo, shard_size, total, batch_size, skip_bad)``, when given, yields the encoded batches (``z`` set) in
    place of this process's loader and encoder (``--engine ray``: :mod:`simsiam_kit.retrieval.ray_engine`).
    ``overwrite``: what an earlier embed wrote in ``output`` is removed first, under the lock."""
    say = log or (lambda s: None)
    out = Path(output).expanduser()
    if out.is_file():
        raise UserError(f"--output {out} is a file; give a directory")
    bs = int(batch_size or embedder.batch_size)
    if bs < 1:
        raise UserError(f"--batch-size must be >= 1 (got {bs})")
    if workers is not None and int(workers) < 0:
        raise UserError(f"--workers must be >= 0 (got {workers})")
    src = source if source is not None else open_source(data, skip_bad_images)
    total = len(src)
    lock = shard_lock(out).acquire()  # first: a run refused because another one writes here times nothing
    try:
        from simsiam_kit.retrieval.embed_search import encoder_image_size, scale_warning

        choose = getattr(embedder, "choose", None)
        timed = callable(choose) and engine is None  # a runtime chosen by timing: first batch, before the fingerprint
        # decoded once: the timing batch (or 16 images), whose first 8 also feed the scale warning, and whose reading
        # time chooses the decoding workers
        t_read = time.perf_counter()
        first = first_images(src, bs, 4 * bs) if timed else first_images(src, 16, 64)
        t_read = time.perf_counter() - t_read
        sides = [_shorter_side(im) for im in first[:8]]
        note = scale_warning(encoder_image_size(embedder), [v for v in sides if v])
        if note:
            say(note)
        if timed and choose is not None:
            choose(first, prefer=_recorded_runtime(out) if resume else None)
        writer = ShardWriter(
            out,
            dim=embedder.dim,
            dtype=dtype,
            shard_size=shard_size,
            fingerprint=fingerprint_of(embedder, src, data, bs),
            resume=resume,
            total=total,
            extra={"classes": src.classes, "source": src.name, "int_ids": _int_ids(src)},
            lock=lock,
            clear=clear_embedding_dir if overwrite else None,
        )
    except BaseException:
        lock.release()
        raise
    with writer:
        for why in writer.dropped:
            say(f"redoing a shard: {why}")
        todo = writer.todo()
        preprocess, encoder = stages(embedder)
        why_workers = ""
        if engine is not None:
            workers = 0  # the engine reads and decodes
        elif workers is None:
            workers, why_workers = choose_workers(first, t_read, preprocess, bs) if todo else (0, "")
        workers = int(workers)
        kept = num_shards(total, shard_size) - len(todo)
        todo_rows = sum(len(range(*shard_range(i, shard_size, total))) for i in todo)
        meta = embedder.meta
        say(
            f"embedding {total} images of {src.name} with {Path(embedder.path).name} ({meta.get('arch')} "
            f"{meta.get('head')}, {embedder.dim}-d, {meta.get('image_size')}px) on {embedder.provider}: "
            f"{len(todo)} shard(s) of {shard_size} to write"
            + (f", {kept} kept from the previous run" if kept else "")
            + ("" if engine is not None else f", {workers} decoding worker(s)")
            + (f" ({why_workers})" if why_workers else "")
        )
        for d in src.damaged:
            say(f"warning: {d['tar']}: {d['error']}; using its {d['samples']} complete samples")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=todo_rows, desc="embed", unit="img", dynamic_ncols=True, smoothing=0.1)
        t0 = time.perf_counter()
        pending: dict = {}
        expected = {i: math.ceil(len(range(*shard_range(i, shard_size, total))) / bs) for i in todo}
        done_rows = 0
        # a finished shard is written (checksums, files, fsync, manifest) by one writer thread while the next one is
        # encoded; one shard in flight at most (its write is awaited before the next is handed over)
        write_pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        writing: Optional[Future] = None
        try:
            pin = getattr(getattr(embedder, "device", None), "type", None) == "cuda"  # the torch runtime on CUDA
            if engine is not None:
                batches = engine(src, todo, shard_size, total, bs, skip_bad_images)
            else:
                batches = iter_batches(src, preprocess, todo, shard_size, total, bs, skip_bad_images, workers, pin)
            for b in batches:
                if "error" in b:
                    raise batch_error(b)
                if "z" not in b:  # an engine hands back encoded batches
                    x = _as_numpy(b.pop("x"))
                    b["z"] = encoder(x) if x is not None else np.zeros((0, embedder.dim), np.float32)
                    del x
                for k in ("row", "label", "width", "height"):
                    b[k] = _as_numpy(b[k])
                parts = pending.setdefault(b["shard"], [])
                parts.append(b)
                if bar is not None:
                    bar.update(b["stop"] - b["start"])
                if len(parts) == expected[b["shard"]]:
                    if writing is not None:
                        writing.result()  # the previous shard's write: its error (a full disk) surfaces here
                    writing = write_pool.submit(_write, writer, pending.pop(b["shard"]), shard_size, total)
                    done_rows += len(range(*shard_range(b["shard"], shard_size, total)))
            if writing is not None:
                writing.result()
        finally:
            write_pool.shutdown(wait=True)  # a shard in flight is finished (or fails) before the lock is released
            if bar is not None:
                bar.close()
        secs = time.perf_counter() - t0
        if pending:  # cannot happen unless a loader drops batches
            raise RuntimeError(f"shards {sorted(pending)} were not completed")
        writer.flush(extra={"damaged_inputs": src.damaged})
        rows = sum(s.rows for s in writer.shards.values())
        skipped = [item for i in sorted(writer.shards) for item in writer.shards[i].skipped]
        summary = {
            "dir": out,
            "source": src,
            "rows": rows,
            "inputs": total,
            "skipped": skipped,
            "damaged_inputs": src.damaged,
            "shards_written": len(todo),
            "shards_kept": kept,
            "seconds": secs,
            "images_per_s": done_rows / max(secs, 1e-9),
            "workers": workers,
        }
        if on_complete is not None:
            on_complete(summary)
        writer.close()
    return summary


def embed_one_shard(
    embedder,
    source: RowSource,
    directory,
    index: int,
    shard_size: int,
    batch_size: int,
    dtype: str = "float32",
    skip_bad_images: bool = False,
):
    """Embed and write shard ``index`` in this process (no lock, no manifest): the unit of work of a
    distributed run (a Ray actor per model), whose result the one writer records with
    :meth:`~simsiam_kit.retrieval.shards.ShardWriter.add`. The same batches as :func:`embed_to_shards`, so the
    same files. Returns the :class:`~simsiam_kit.retrieval.shards.ShardInfo`."""
    from simsiam_kit.retrieval.shards import write_shard_files

    total = len(source)
    preprocess, encoder = stages(embedder)
    parts = []
    for shard, a, b in batch_ranges([index], shard_size, total, batch_size):
        part = make_batch(source, preprocess, shard, a, b, skip_bad_images)
        if "error" in part:
            raise batch_error(part)
        x = part.pop("x")
        part["z"] = encoder(x) if x is not None else np.zeros((0, embedder.dim), np.float32)
        parts.append(part)
    z, cols, skipped = _assemble(parts, embedder.dim)
    inputs = len(range(*shard_range(index, shard_size, total)))
    return write_shard_files(directory, index, z, cols, inputs, dtype, skipped, shard_size=shard_size)


def _int_ids(src: RowSource) -> bool:
    """Ids that are array rows (npz, torchvision, demo): ids.json keeps them as numbers."""
    return isinstance(src, DatasetSource) and all(isinstance(i, (int, np.integer)) for i in src.ds.ids)


def _assemble(parts: list[dict], dim: int) -> tuple:
    """One shard's (embeddings, columns, skipped) from its batches, in row order."""
    parts = sorted(parts, key=lambda p: p["start"])
    z = np.concatenate([p["z"] for p in parts]) if parts else np.zeros((0, dim), np.float32)
    cols: dict[str, Any] = {k: np.concatenate([p[k] for p in parts]) for k in ("row", "label", "width", "height")}
    cols["id"] = [str(i) for p in parts for i in p["id"]]
    return z, cols, [s for p in parts for s in p["skipped"]]


def _write(writer: ShardWriter, parts: list[dict], shard_size: int, total: int) -> None:
    shard = parts[0]["shard"]
    z, cols, skipped = _assemble(parts, writer.dim)
    writer.write_shard(shard, z, cols, inputs=len(range(*shard_range(shard, shard_size, total))), skipped=skipped)


# ------------------------------------------------------------------------------------------ finish
def _npy_header(f, shape: tuple, descr: str) -> None:
    np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})


def finish_dir(out: Path, index_kind: str = "flat", backend: str = "faiss") -> dict:
    """Write ``embeddings.npy``, ``ids.json``, ``labels.npy`` and the index of a complete shard directory,
    streaming the verified shards one at a time (the index itself holds what it indexes)."""
    import pyarrow.parquet as pq

    from simsiam_kit.retrieval.index import EmbeddingIndex
    from simsiam_kit.retrieval.shards import read_manifest
    from simsiam_kit.utils.io import atomic_stream

    m = read_manifest(out)
    if m is None or not m.get("complete"):
        raise UserError(f"{out}: the shards are not complete; rerun `simsiam-kit embed --resume`")
    dim = m["dim"]
    n = sum(s.rows for s in m["shards"])
    if n == 0:
        raise UserError(f"{out}: no readable images were embedded")
    labelled = True
    int_ids = m["extra"].get("int_ids", False)
    for s in m["shards"]:  # labels only (small): are they all present?
        lab = pq.read_table(out / s.parquet["file"], columns=["label"]).column("label").to_numpy()
        labelled = labelled and bool((lab >= 0).all())
    index = EmbeddingIndex(dim, index_kind, backend)
    incremental = index_kind in ("flat", "hnsw") and index.backend == "faiss"
    with contextlib.ExitStack() as stack:
        fe = stack.enter_context(atomic_stream(out / "embeddings.npy"))
        fi = stack.enter_context(atomic_stream(out / "ids.json"))
        fl = stack.enter_context(atomic_stream(out / "labels.npy")) if labelled else None
        _npy_header(fe, (n, dim), "<f4")
        if fl is not None:
            _npy_header(fl, (n,), "<i8")
        fi.write(b"[")
        first = True
        for _, z, table in iter_shards(out, verify=True):
            z32 = np.ascontiguousarray(z, dtype="<f4")
            fe.write(z32.tobytes())
            if incremental and len(z32):
                index.add(z32)
            ids = table.column("id").to_pylist()
            if int_ids:
                ids = [int(i) for i in ids]
            if ids:
                text = ",\n  ".join(json.dumps(i) for i in ids)
                fi.write(((",\n  " if not first else "\n  ") + text).encode("utf-8"))
                first = False
            if fl is not None:
                fl.write(np.ascontiguousarray(table.column("label").to_numpy(), dtype="<i8").tobytes())
        fi.write(b"\n]\n")
    if not labelled and (out / "labels.npy").exists():
        (out / "labels.npy").unlink()  # stale labels of an earlier run would misalign
    if not incremental:
        index.add(np.load(out / "embeddings.npy"))
    index.save(out)
    return {"count": n, "labels": labelled, "classes": m["extra"].get("classes") if labelled else None, "index": index}


def embed_to_dir(
    embedder,
    data: str,
    output,
    index_kind: str = "flat",
    backend: str = "faiss",
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: str = "float32",
    resume: bool = False,
    skip_bad_images: bool = False,
    workers: Optional[int] = None,
    batch_size: Optional[int] = None,
    progress: bool = False,
    log=None,
    engine: Optional[Callable] = None,
    overwrite: bool = False,
) -> dict:
    """Embed a dataset spec into shards, then (``index_kind != "none"``) the files ``search`` reads; write
    ``embed.json`` and return its content (see the module docstring)."""
    from simsiam_kit.retrieval.index import EmbeddingIndex
    from simsiam_kit.utils.io import atomic_write_json

    say = log or (lambda s: None)
    if index_kind != "none":
        EmbeddingIndex(embedder.dim, index_kind, backend)  # validate before spending time on embeddings
    src = open_source(data, skip_bad_images)
    manifest: dict = {}

    def finish(run: dict) -> None:
        out = run["dir"]
        manifest.update(
            {
                "format": "simsiam-kit-embeddings",
                "model": str(Path(embedder.path).resolve()),
                "model_sha256": file_sha256(Path(embedder.path)),
                "model_metadata": {
                    k: embedder.meta.get(k)
                    for k in ("arch", "stem", "head", "embedding_dim", "image_size", "precision")
                },
                "data": data,
                "count": run["rows"],
                "skipped": len(run["skipped"]),
                "skipped_images": run["skipped"][:SKIPPED_LISTED],
                "damaged_inputs": run["damaged_inputs"],
                "dim": embedder.dim,
                "normalized": True,
                "labels": False,
                "classes": None,
                "index": None,
                "shards": {"manifest": "manifest.json", "shard_size": shard_size, "dtype": dtype},
                "provider": embedder.provider,
                "runtime": getattr(embedder, "runtime", "onnxruntime"),
                "workers": run["workers"],
                "seconds": round(run["seconds"], 3),
                "images_per_s": round(run["images_per_s"], 1),
            }
        )
        if index_kind != "none":
            fin = finish_dir(out, index_kind, backend)
            index = fin["index"]
            manifest.update(
                labels=fin["labels"], classes=fin["classes"], index={"kind": index.kind, "backend": index.backend}
            )
        atomic_write_json(out / MANIFEST, manifest)

    run = embed_to_shards(
        embedder,
        data,
        output,
        shard_size=shard_size,
        dtype=dtype,
        resume=resume,
        skip_bad_images=skip_bad_images,
        workers=workers,
        batch_size=batch_size,
        progress=progress,
        log=log,
        source=src,
        on_complete=finish,
        engine=engine,
        overwrite=overwrite,
    )
    out = run["dir"]
    if run["skipped"]:
        n = len(run["skipped"])
        first = ", ".join(s["id"] for s in run["skipped"][:3]) + (", ..." if n > 3 else "")
        say(f"skipped {n} unreadable image(s) ({first}); all listed in {out / 'manifest.json'}")
    say(
        f"wrote {run['rows']} embeddings in {num_shards(run['inputs'], shard_size)} shard(s) "
        f"({run['shards_written']} new, {run['images_per_s']:.0f} images/s)"
        + (f" and a {manifest['index']['kind']} index ({manifest['index']['backend']})" if manifest["index"] else "")
        + f" to {out}"
    )
    return manifest
