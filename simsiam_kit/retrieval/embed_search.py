"""Embedding search as an application: embed a dataset into a directory (embeddings, ids, labels, the
index, a manifest), then search it with query images (``simsiam-kit embed`` / ``simsiam-kit search``).

The model is an argument, not an import: anything with the :class:`Embedder` attributes works, and the
command layer passes ``export.OnnxEmbedder`` (the core never imports ``export``)::

    from simsiam_kit.export import OnnxEmbedder
    embed_dataset_to_dir(OnnxEmbedder("encoder.onnx"), "path/to/images", "emb/")
    report = search_images("emb/", "photo.png", open_embedder=OnnxEmbedder, k=10)
    print(format_search_table(report))

:func:`embed_dataset_to_dir` runs the streaming pipeline (:mod:`simsiam_kit.retrieval.pipeline`): decoding
workers, embeddings written in atomic, resumable shards (``manifest.json`` + ``shards/``, the format of
:mod:`simsiam_kit.retrieval.shards`), then the files search reads, streamed from the shards.
A directory written by :func:`embed_dataset_to_dir` holds ``embeddings.npy`` (float32 (N, D),
l2-normalised), ``ids.json`` (file path relative to an ImageFolder root, or the row of an array
dataset), ``labels.npy`` (only when every image is labelled), the index (``index.json`` +
``index.faiss`` or ``index_vectors.npy``) and ``embed.json`` (model path and sha256, model metadata,
dataset, count, index kind, provider, timing).

Where a change goes: the shard format in :mod:`simsiam_kit.retrieval.shards`; the pipeline (workers,
batches, resume, the finishing step) in :mod:`simsiam_kit.retrieval.pipeline`; loading and searching here;
the search and its order in :mod:`simsiam_kit.retrieval.index`; the model runtime (onnxruntime, preprocessing) in
``export/embedder.py``; options in ``simsiam_kit/cli/embed.py`` (embed, search).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol

import numpy as np

from simsiam_kit.errors import UserError
from simsiam_kit.utils.io import file_sha256

MANIFEST = "embed.json"


class Embedder(Protocol):
    """What the application needs of a model runtime (``export.OnnxEmbedder`` is one)."""

    path: Path  # the model file: recorded in embed.json with its sha256
    meta: dict  # model metadata: arch, stem, head, embedding_dim, image_size, precision
    dim: int
    provider: str  # where it runs, e.g. "CPUExecutionProvider"
    batch_size: int  # images per call of embed

    def embed(self, images) -> np.ndarray:
        """l2-normalised float32 (N, D) embeddings of a batch (PIL images, paths or uint8 arrays)."""

    # Optional, used by the streaming pipeline when present (``OnnxEmbedder`` has both): ``preprocess(images)``
    # -> float32 (N, 3, S, S), run in the decoding workers, and ``run(x)`` -> raw (N, D) rows, in the encoder;
    # ``chunk``: the most images per ``run`` call. See simsiam_kit/retrieval/pipeline.py.


def list_images(path) -> list[Path]:
    """An image file, or the image files under a directory (recursive, sorted)."""
    from simsiam_kit.data.datasets import IMG_EXTENSIONS

    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise UserError(f"no images found under {p} ({', '.join(IMG_EXTENSIONS)})")
        return files
    raise UserError(f"query not found: {p} (expected an image file or a directory of images)")


def embed_dataset(embedder: Embedder, ds, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of an :class:`~simsiam_kit.data.datasets.ImageDataset` and the row indices kept
    (unreadable files are skipped when the dataset has ``skip_bad_images``)."""
    bs = embedder.batch_size
    rows = np.arange(len(ds))
    chunks: Iterable[int] = range(0, len(ds), bs)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="embed", unit="batch")
    outs, kept = [], []
    for s in chunks:
        idx = rows[s : s + bs]
        if ds.in_memory:
            imgs = ds.images[idx]
        else:
            loaded = [(i, ds.load_pil(int(i))) for i in idx]
            loaded = [(i, im) for i, im in loaded if im is not None]
            if not loaded:
                continue
            idx = np.asarray([i for i, _ in loaded])
            imgs = [im for _, im in loaded]
        outs.append(embedder.embed(imgs))
        kept.append(idx)
    if not outs:
        raise UserError(f"dataset '{ds.name}': no readable images")
    return np.concatenate(outs), np.concatenate(kept)


def embed_dataset_to_dir(
    embedder: Embedder,
    data: str,
    output,
    index_kind: str = "flat",
    backend: str = "faiss",
    skip_bad_images: bool = False,
    progress: bool = False,
    log=None,
    **options,
) -> dict:
    """Embed a dataset spec with ``embedder``; write the shards (``manifest.json``, ``shards/``), then
    ``embeddings.npy``, ``ids.json``, ``labels.npy`` (when labelled), the index (``index.json`` +
    ``index.faiss``) and ``embed.json``; return the manifest. The streaming pipeline and its ``options``
    (``shard_size``, ``dtype``, ``resume``, ``workers``, ``batch_size``) are
    :func:`simsiam_kit.retrieval.pipeline.embed_to_dir`'s."""
    from simsiam_kit.retrieval.pipeline import embed_to_dir

    return embed_to_dir(
        embedder,
        data,
        output,
        index_kind=index_kind,
        backend=backend,
        skip_bad_images=skip_bad_images,
        progress=progress,
        log=log,
        **options,
    )


def load_embeddings_dir(index_dir) -> dict:
    """The manifest, ids, labels and index written by :func:`embed_dataset_to_dir`, each checked before it is
    used (a directory may come from anywhere: :mod:`simsiam_kit.retrieval.files`); a missing or malformed
    file is a :class:`UserError` naming it and what is wrong."""
    from simsiam_kit.retrieval.files import load_npy, read_json
    from simsiam_kit.retrieval.index import EmbeddingIndex

    d = Path(index_dir).expanduser()
    mp = d / MANIFEST
    if not mp.is_file():
        raise UserError(f"{d}: no {MANIFEST}; build the index with `simsiam-kit embed --output {d}`")
    _check_not_being_written(d)
    manifest = read_json(mp, dict)
    checks = (
        ("model", lambda v: isinstance(v, str), "a string"),
        ("model_sha256", lambda v: v is None or isinstance(v, str), "a string or null"),
        (
            "classes",
            lambda v: v is None or (isinstance(v, list) and all(isinstance(c, str) for c in v)),
            "a list of class names or null",
        ),
    )
    for key, ok, want in checks:
        if key in manifest and not ok(manifest[key]):
            raise UserError(f"{mp}: key '{key}' must be {want}, got {repr(manifest[key])[:80]}")
    if manifest.get("index", True) is None and not (d / "ids.json").is_file():
        raise UserError(f"{d}: embedded with --index none (shards only, no index to search); build one from its shards")
    ids = read_json(d / "ids.json", list, "the ids of the indexed images")
    labels = None
    if (d / "labels.npy").is_file():
        labels = load_npy(d / "labels.npy", "iu", 1)
        if len(labels) != len(ids):
            raise UserError(f"{d / 'labels.npy'}: {len(labels)} labels for the {len(ids)} images of ids.json")
    count = manifest.get("count")
    if isinstance(count, int) and not isinstance(count, bool) and count != len(ids):
        raise UserError(
            f"{d}: {MANIFEST} counts {count} embeddings but ids.json lists {len(ids)}: the files are of two runs "
            "(embed again with --overwrite)"
        )
    _check_shards_match(d, count)
    index = EmbeddingIndex.load(d)
    if index.ntotal != len(ids):
        raise UserError(f"{d}: index holds {index.ntotal} vectors but ids.json lists {len(ids)}")
    return {"dir": d, "manifest": manifest, "ids": ids, "labels": labels, "index": index}


def _check_not_being_written(d: Path) -> None:
    """An embed (or ``index build``) holding the directory's lock is rewriting it file by file: what a reader
    would load could mix two runs."""
    from simsiam_kit.utils.dirlock import lock_holder

    holder = lock_holder(d)
    if holder is not None:
        pid = f" (pid {holder})" if holder else ""
        raise UserError(
            f"{d}: another process (embed or index build) is writing to this directory{pid}; its files may be of "
            "two runs until it ends: search it when that run has finished"
        )


def _check_shards_match(d: Path, count) -> None:
    """The shards (``manifest.json``, when the directory has them) must be the complete run ``embed.json``
    describes: incomplete shards, or shards of another number of rows, mean they were rewritten after the
    index was built (the directory mixes two runs)."""
    from simsiam_kit.retrieval.shards import MANIFEST_NAME, read_manifest

    if not (d / MANIFEST_NAME).is_file():
        return  # a directory without shards (written before them, or copied without them)
    m = read_manifest(d)
    if m is None:
        return
    rows = sum(s.rows for s in m["shards"])
    if not m.get("complete") or (isinstance(count, int) and rows != count):
        state = "complete" if m.get("complete") else "incomplete"
        raise UserError(
            f"{d / MANIFEST_NAME}: {state} shards of {rows} rows, not the {count} embeddings {MANIFEST} and the "
            "index hold: the shards were rewritten after the index was built (the directory mixes two runs); "
            "finish that run with `simsiam-kit embed --resume`, or embed again with --overwrite"
        )


#: an encoder that takes images this small or smaller ...
SMALL_ENCODER_PX = 32
#: ... given images whose shorter side is at least this many times larger: each is shrunk to the encoder's size
SCALE_MISMATCH = 4


def scale_warning(image_size: Optional[int], sides: list[int]) -> Optional[str]:
    """A warning when the images are much larger than what a small encoder takes (the demo's 16 px digits encoder
    given photos: every photo shrunk to 16 px, the median cosine similarity of two unrelated coco128 photos is
    0.80, so the neighbours say little), else None. ``sides``: the shorter sides of a few of the images."""
    if not image_size or image_size > SMALL_ENCODER_PX or not sides:
        return None
    med = sorted(sides)[len(sides) // 2]
    if med < SCALE_MISMATCH * image_size:
        return None
    return (
        f"warning: this encoder takes {image_size} px images and these are about {med} px (shorter side, median of "
        f"{len(sides)}): each is shrunk to {image_size} px, so the neighbours will say little about them; an encoder "
        'trained on images like these fits better (README: "Evaluate a checkpoint you already have")'
    )


def encoder_image_size(embedder) -> Optional[int]:
    """The image size an embedder takes: its ``image_size``, else its model metadata's (the runtime chooser)."""
    size = getattr(embedder, "image_size", None) or (getattr(embedder, "meta", None) or {}).get("image_size")
    return int(size) if size else None


def image_sides(files) -> list[int]:
    """The shorter side of each readable image file among ``files`` (from its header; unreadable ones left out)."""
    from PIL import Image

    sides = []
    for f in files:
        try:
            with Image.open(f) as im:
                sides.append(min(im.size))
        except Exception:  # noqa: BLE001 - only a hint: the search itself reports unreadable files
            continue
    return sides


def search_images(
    index_dir,
    query,
    open_embedder: Callable[[Path], Embedder],
    k: int = 10,
    model=None,
    output=None,
    log=None,
    nprobe: Optional[int] = None,
    ef: Optional[int] = None,
) -> dict:
    """k nearest indexed images (cosine similarity) of an image file or every image under a directory.

    ``open_embedder(path)`` opens the model: ``model`` when given, else the one recorded in the
    directory's manifest. ``nprobe`` / ``ef``: the search-time knobs of an approximate index
    (:meth:`~simsiam_kit.retrieval.index.EmbeddingIndex.set_search_params`); the report says whether the
    index is approximate and the recall@10 its build measured."""
    from simsiam_kit.utils.io import atomic_write_json

    say = log or (lambda s: None)
    from simsiam_kit.retrieval.index import check_k

    check_k(k, name="--k")
    store = load_embeddings_dir(index_dir)
    manifest, index = store["manifest"], store["index"]
    index.set_search_params(nprobe=nprobe, ef=ef)
    model_path = Path(model).expanduser() if model else Path(manifest.get("model", ""))
    if not model_path.is_file():
        raise UserError(f"model {model_path} (recorded in {store['dir'] / MANIFEST}) not found; pass --model FILE.onnx")
    files = list_images(query)
    emb = open_embedder(model_path)
    note = scale_warning(encoder_image_size(emb), image_sides(files[:8]))
    if note:
        say(note)
    if emb.dim != index.dim:
        raise UserError(
            f"index {store['dir']} was built with a {index.dim}-d model, but {model_path} gives "
            f"{emb.dim}-d embeddings: rebuild it with `simsiam-kit embed --model {model_path}`"
        )
    if manifest.get("model_sha256") and file_sha256(model_path) != manifest["model_sha256"]:
        say(
            f"warning: {model_path} is not the model that built this index ({manifest.get('model')}); "
            "scores compare embeddings of two different encoders"
        )
    k_eff = min(k, index.ntotal)
    q = emb.embed([str(f) for f in files])
    sims, rows = index.search(q, k_eff)
    classes = manifest.get("classes")
    results = []
    for f, srow, irow in zip(files, sims, rows):
        neigh = []
        for rank, (s, r) in enumerate(zip(srow.tolist(), irow.tolist()), 1):
            if r < 0:  # faiss pads with -1 when an approximate index finds fewer than k
                continue
            item = {"rank": rank, "row": int(r), "id": store["ids"][r], "score": round(float(s), 6)}
            if store["labels"] is not None:
                lab = int(store["labels"][r])
                item["label"] = lab
                if classes and 0 <= lab < len(classes):
                    item["class"] = classes[lab]
            neigh.append(item)
        results.append({"query": str(f), "neighbours": neigh})
    report = {
        "index": str(store["dir"]),
        "model": str(model_path),
        "provider": emb.provider,
        "k": k_eff,
        "index_kind": index.kind,
        "approximate": index.approximate,
        "recall_at_10": index.recall,
        "search_params": index.search_params(),
        "index_description": index.describe(),
        "results": results,
    }
    if output is not None:
        atomic_write_json(Path(output).expanduser(), report)
        report["output"] = str(output)
    return report


def format_search_table(report: dict) -> str:
    lines = [f"{'query':<32} {'rank':>4} {'score':>8}  {'id':<28} label"]
    for r in report["results"]:
        q = Path(r["query"]).name
        for n in r["neighbours"]:
            lab = n.get("class", n.get("label", ""))
            lines.append(f"{q[-32:]:<32} {n['rank']:>4} {n['score']:>8.4f}  {str(n['id'])[-28:]:<28} {lab}")
            q = ""
    return "\n".join(lines)
