"""Embeddings from an exported encoder with onnxruntime: ``OnnxEmbedder(path).embed(images)``.

The ``.onnx`` file written by :func:`export.onnx.export_onnx` carries its preprocessing facts in
``metadata_props`` (image size, mean, std, channel order, embedding dimension, ...), so the embedder
needs nothing but the path::

    from export import OnnxEmbedder
    emb = OnnxEmbedder("encoder.onnx")
    z = emb.embed([pil_image, "photo.jpg", uint8_array])   # (3, D) float32, l2-normalised

Preprocessing (identical for every input type):

1. decode / convert to 8-bit RGB (grayscale is replicated to three channels, an alpha channel is
   dropped, palette images are converted);
2. images that are already ``image_size x image_size`` are used as they are; any other size has its
   shorter side resized (bilinear) to ``round(image_size / 0.875)`` and is centre-cropped to
   ``image_size`` (the evaluation transform of the ImageFolder loader);
3. ``x = (pixels / 255 - mean) / std`` per channel, laid out ``N, 3, H, W`` float32.

onnxruntime runs on CUDA when onnxruntime-gpu sees a GPU, else on the CPU; :attr:`OnnxEmbedder.provider`
says which one ran (it is also logged).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from simsiam_kit.errors import UserError, require_extra

log = logging.getLogger("simsiam_kit.export")

FORMAT = "simsiam-kit-onnx-encoder"
CROP_PCT = 0.875
REQUIRED_META = ("format", "image_size", "mean", "std", "channel_order", "embedding_dim", "input_name",
                 "output_name")
DEVICES = ("auto", "cpu", "cuda")


# --------------------------------------------------------------------------- onnxruntime sessions
def make_session(model, device: str = "auto", threads: Optional[int] = None, source: str = "model"):
    """An ``onnxruntime.InferenceSession`` on CUDA when available (``device="auto"``), else CPU.

    ``model`` is a path or serialised bytes. Returns ``(session, provider_name)``; a file that is not a
    valid ONNX model raises :class:`UserError` naming it.
    """
    if device not in DEVICES:
        raise UserError(f"unknown device '{device}' (available: {', '.join(DEVICES)})")
    ort = require_extra("onnxruntime", "cpu")
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device == "cuda":
        raise UserError("--device cuda: onnxruntime has no CUDAExecutionProvider here "
                        "(install the 'gpu' extra: pip install -e '.[gpu]')")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: CUDA-provider fallbacks are reported by us, once
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        sess = ort.InferenceSession(str(model) if isinstance(model, Path) else model, sess_options=opts,
                                    providers=providers)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load ONNX model {source}: {msg[:300]}") from None
    provider = sess.get_providers()[0]
    if device == "cuda" and provider != "CUDAExecutionProvider":
        raise UserError("--device cuda: onnxruntime-gpu sees no usable GPU (the CPU provider would run)")
    log.info("onnxruntime provider for %s: %s", source, provider)
    return sess, provider


# --------------------------------------------------------------------------- preprocessing
def _to_rgb_array(img, what: str = "image") -> np.ndarray:
    """One image (PIL, path or uint8 array) -> uint8 (H, W, 3) RGB."""
    from PIL import Image

    if isinstance(img, (str, Path)):
        p = Path(img)
        try:
            with Image.open(p) as im:
                im.load()
                return _to_rgb_array(im, str(p))
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read image {p}: {type(e).__name__}: {e}") from None
    if isinstance(img, Image.Image):
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bit, not clip
            a = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
            img = Image.fromarray((a / top * 255.0).round().clip(0, 255).astype(np.uint8))
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise UserError(f"{what}: expected uint8 pixels (0-255), got dtype {a.dtype}; "
                        "scale to 0-255 and cast to uint8, or pass a PIL image")
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1)
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        if a.shape[-1] == 1:
            return np.repeat(a, 3, axis=-1)
        return a[..., :3]
    raise UserError(f"{what}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 array "
                    f"(channels last), got shape {a.shape}")


def _resize_crop(a: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to round(size / 0.875) (bilinear), centre crop ``size``; no-op at size x size.

    Sizes and crop offsets follow torchvision's ``Resize(int)`` + ``CenterCrop`` on PIL images, so a
    file dataset embedded here matches :func:`simsiam_kit.features.extract_features` on it.
    """
    h, w = a.shape[:2]
    if h == size and w == size:
        return a
    from PIL import Image

    short = int(round(size / CROP_PCT))
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    im = Image.fromarray(a).resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _is_batch(images) -> bool:
    from PIL import Image

    if isinstance(images, (list, tuple)):
        return True
    if isinstance(images, (str, Path, Image.Image)):
        return False
    a = np.asarray(images)
    return a.ndim == 4


def preprocess(images, image_size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Images (one or a batch) -> float32 (N, 3, image_size, image_size), normalised as in the metadata."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype == np.uint8 \
            and images.shape[1:] == (image_size, image_size, 3):
        batch = images  # fast path: an in-memory uint8 batch at the model's size
    else:
        items = list(images) if _is_batch(images) else [images]
        if not items:
            raise UserError("no images to embed")
        batch = np.stack([_resize_crop(_to_rgb_array(im, f"image {i}"), image_size) for i, im in enumerate(items)])
    x = batch.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32)


# --------------------------------------------------------------------------- metadata
def read_metadata(path) -> dict:
    """The simsiam-kit ``metadata_props`` of an exported model, values decoded (lists, ints)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise UserError(f"ONNX model not found: {p}")
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise UserError(f"{p}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    return decode_metadata({kv.key: kv.value for kv in m.metadata_props}, str(p))


def decode_metadata(raw: dict, source: str) -> dict:
    missing = [k for k in REQUIRED_META if k not in raw]
    if missing or raw.get("format") != FORMAT:
        raise UserError(f"{source}: not a simsiam-kit encoder (metadata_props lack {', '.join(missing) or 'format'}); "
                        "export it with `simsiam-kit export onnx`")
    meta = dict(raw)
    try:
        for k in ("image_size", "embedding_dim", "opset"):
            if k in meta:
                meta[k] = int(meta[k])
        for k in ("mean", "std"):
            meta[k] = [float(v) for v in json.loads(meta[k])]
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: malformed metadata_props ({e})") from None
    if meta["channel_order"] != "RGB" or len(meta["mean"]) != 3 or len(meta["std"]) != 3:
        raise UserError(f"{source}: unsupported preprocessing metadata (channel_order={meta['channel_order']}, "
                        f"mean={meta['mean']}, std={meta['std']})")
    return meta


# --------------------------------------------------------------------------- embedder
class OnnxEmbedder:
    """Embed images with an exported simsiam-kit encoder.

    ``normalize=True`` (default) returns l2-normalised embeddings (cosine similarity = dot product),
    ``False`` the raw encoder output. ``device``: "auto" (CUDA when onnxruntime-gpu sees a GPU, else
    CPU), "cpu" or "cuda". ``threads``: onnxruntime intra-op threads (default: all cores).
    """

    def __init__(self, path, normalize: bool = True, device: str = "auto", batch_size: int = 64,
                 threads: Optional[int] = None):
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        self.session, self.provider = make_session(self.path, device, threads, source=str(self.path))
        self.image_size = self.meta["image_size"]
        self.mean, self.std = tuple(self.meta["mean"]), tuple(self.meta["std"])
        self.dim = self.meta["embedding_dim"]
        self.input_name, self.output_name = self.meta["input_name"], self.meta["output_name"]
        names = [i.name for i in self.session.get_inputs()]
        if names != [self.input_name]:
            raise UserError(f"{self.path}: graph inputs {names} do not match metadata input_name '{self.input_name}'")
        self.normalize = normalize
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1 (got {batch_size})")
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return (f"OnnxEmbedder({str(self.path)!r}, arch={self.meta.get('arch')}, head={self.meta.get('head')}, "
                f"dim={self.dim}, image_size={self.image_size}, provider={self.provider})")

    def preprocess(self, images) -> np.ndarray:
        return preprocess(images, self.image_size, self.mean, self.std)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw encoder output for an already preprocessed float32 (N, 3, S, S) batch."""
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def embed(self, images, normalize: Optional[bool] = None) -> np.ndarray:
        """float32 (N, D) embeddings of one image or a batch (PIL images, paths, uint8 arrays)."""
        if not _is_batch(images):
            images = [images]
        elif isinstance(images, tuple):
            images = list(images)
        n = len(images)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        outs = [self.run(self.preprocess(images[s:s + self.batch_size])) for s in range(0, n, self.batch_size)]
        z = np.concatenate(outs)
        return l2_normalize(z) if (self.normalize if normalize is None else normalize) else z

    def embed_dataset(self, ds, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of an :class:`~simsiam_kit.data.datasets.ImageDataset` and the row indices kept
        (unreadable files are skipped when the dataset has ``skip_bad_images``)."""
        rows = np.arange(len(ds))
        chunks = range(0, len(ds), self.batch_size)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="embed", unit="batch")
        outs, kept = [], []
        for s in chunks:
            idx = rows[s:s + self.batch_size]
            if ds.in_memory:
                imgs = ds.images[idx]
            else:
                loaded = [(i, ds.load_pil(int(i))) for i in idx]
                loaded = [(i, im) for i, im in loaded if im is not None]
                if not loaded:
                    continue
                idx = np.asarray([i for i, _ in loaded])
                imgs = [im for _, im in loaded]
            outs.append(self.embed(imgs))
            kept.append(idx)
        if not outs:
            raise UserError(f"dataset '{ds.name}': no readable images")
        return np.concatenate(outs), np.concatenate(kept)


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


def chunked(seq: Sequence, n: int) -> Iterable[Sequence]:
    for s in range(0, len(seq), n):
        yield seq[s:s + n]


# --------------------------------------------------------------------------- embed a dataset / search
MANIFEST = "embed.json"


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def embed_dataset_to_dir(model, data: str, output, batch_size: int = 64, index_kind: str = "flat",
                         backend: str = "faiss", device: str = "auto", skip_bad_images: bool = False,
                         progress: bool = False, log=None) -> dict:
    """Embed a dataset spec with an exported encoder; write ``embeddings.npy``, ``ids.json``,
    ``labels.npy`` (when labelled), the index (``index.json`` + ``index.faiss``) and ``embed.json``."""
    import time

    from simsiam_kit.data.datasets import load_dataset
    from simsiam_kit.index import EmbeddingIndex
    from simsiam_kit.utils.io import atomic_write_json

    say = log or (lambda s: None)
    out = Path(output).expanduser()
    if out.is_file():
        raise UserError(f"--output {out} is a file; give a directory")
    emb = OnnxEmbedder(model, device=device, batch_size=batch_size)
    # validate the index settings before spending time on the embeddings
    EmbeddingIndex(emb.dim, index_kind, backend)
    ds = load_dataset(data, skip_bad_images=skip_bad_images)
    say(f"embedding {len(ds)} images of {ds.name} with {emb.path.name} ({emb.meta.get('arch')} {emb.meta.get('head')}, "
        f"{emb.dim}-d, {emb.image_size}px) on onnxruntime {emb.provider}")
    t0 = time.perf_counter()
    z, rows = emb.embed_dataset(ds, progress=progress)
    secs = time.perf_counter() - t0
    index = EmbeddingIndex(emb.dim, index_kind, backend).add(z)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", z)
    ids = [ds.ids[int(i)] for i in rows]
    atomic_write_json(out / "ids.json", [i if isinstance(i, (int, str)) else str(i) for i in ids])
    labels = ds.labels[rows]
    has_labels = len(labels) > 0 and bool((labels >= 0).all())
    if has_labels:
        np.save(out / "labels.npy", labels.astype(np.int64))
    elif (out / "labels.npy").exists():
        (out / "labels.npy").unlink()  # stale labels of an earlier run would misalign
    index.save(out)
    manifest = {
        "format": "simsiam-kit-embeddings", "model": str(emb.path.resolve()), "model_sha256": _sha256(emb.path),
        "model_metadata": {k: emb.meta.get(k) for k in ("arch", "stem", "head", "embedding_dim", "image_size",
                                                        "precision")},
        "data": data, "count": int(len(z)), "skipped": int(len(ds) - len(z)), "dim": emb.dim, "normalized": True,
        "labels": bool(has_labels), "classes": ds.classes if has_labels else None,
        "index": {"kind": index.kind, "backend": index.backend}, "provider": emb.provider,
        "seconds": round(secs, 3), "images_per_s": round(len(z) / max(secs, 1e-9), 1),
    }
    atomic_write_json(out / MANIFEST, manifest)
    say(f"wrote {len(z)} embeddings ({secs:.1f} s, {manifest['images_per_s']:.0f} images/s) and a "
        f"{index.kind} index ({index.backend}) to {out}")
    return manifest


def load_embeddings_dir(index_dir) -> dict:
    """The manifest, ids, labels and index written by :func:`embed_dataset_to_dir`."""
    from simsiam_kit.index import EmbeddingIndex

    d = Path(index_dir).expanduser()
    mp = d / MANIFEST
    if not mp.is_file():
        raise UserError(f"{d}: no {MANIFEST}; build the index with `simsiam-kit embed --output {d}`")
    try:
        manifest = json.loads(mp.read_text())
        ids = json.loads((d / "ids.json").read_text())
    except FileNotFoundError as e:
        raise UserError(f"{d}: missing {Path(e.filename).name}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{d}: invalid JSON ({e})") from None
    labels = np.load(d / "labels.npy") if (d / "labels.npy").is_file() else None
    index = EmbeddingIndex.load(d)
    if index.ntotal != len(ids):
        raise UserError(f"{d}: index holds {index.ntotal} vectors but ids.json lists {len(ids)}")
    return {"dir": d, "manifest": manifest, "ids": ids, "labels": labels, "index": index}


def search_images(index_dir, query, k: int = 10, model=None, device: str = "auto", output=None, log=None) -> dict:
    """k nearest indexed images (cosine similarity) of an image file or every image under a directory."""
    from simsiam_kit.utils.io import atomic_write_json

    say = log or (lambda s: None)
    if k < 1:
        raise UserError(f"--k must be >= 1 (got {k})")
    store = load_embeddings_dir(index_dir)
    manifest, index = store["manifest"], store["index"]
    model_path = Path(model).expanduser() if model else Path(manifest.get("model", ""))
    if not model_path.is_file():
        raise UserError(f"model {model_path} (recorded in {store['dir'] / MANIFEST}) not found; pass --model FILE.onnx")
    files = list_images(query)
    emb = OnnxEmbedder(model_path, device=device)
    if emb.dim != index.dim:
        raise UserError(f"index {store['dir']} was built with a {index.dim}-d model, but {model_path} gives "
                        f"{emb.dim}-d embeddings: rebuild it with `simsiam-kit embed --model {model_path}`")
    if manifest.get("model_sha256") and _sha256(model_path) != manifest["model_sha256"]:
        say(f"warning: {model_path} is not the model that built this index ({manifest.get('model')}); "
            "scores compare embeddings of two different encoders")
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
    report = {"index": str(store["dir"]), "model": str(model_path), "provider": emb.provider, "k": k_eff,
              "index_kind": index.kind, "results": results}
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
