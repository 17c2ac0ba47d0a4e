"""Embeddings from an exported encoder with onnxruntime: ``OnnxEmbedder(path).embed(images)``.

The ``.onnx`` file written by :func:`export.onnx.export_onnx` carries its preprocessing facts in
``metadata_props`` (image size, mean, std, channel order, embedding dimension, ...), so the embedder
needs nothing but the path::

    from simsiam_kit.export import OnnxEmbedder
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

This module is the runtime of an exported model only: sessions, preprocessing, metadata, the
embedder. Embedding a dataset into a directory and searching it (``simsiam-kit embed`` / ``search``)
is the core's application, :mod:`simsiam_kit.retrieval.embed_search`, which takes an ``OnnxEmbedder``
as its model. A new input type or preprocessing step goes in ``preprocess``; a new metadata key in
``export/onnx.py`` (which writes it) and ``decode_metadata`` (which reads it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from simsiam_kit.config import DEFAULT_CROP_PCT
from simsiam_kit.errors import UserError, require_extra
from simsiam_kit.utils.vectors import check_finite_embeddings, l2_normalize  # the core's, every runtime uses them

log = logging.getLogger("simsiam_kit.export")

FORMAT = "simsiam-kit-onnx-encoder"
CROP_PCT = DEFAULT_CROP_PCT  # the core's eval resize rule (simsiam_kit.config), shared with the loaders
REQUIRED_META = ("format", "image_size", "mean", "std", "channel_order", "embedding_dim", "input_name", "output_name")
# what the export writes as ``precision``; the graph's I/O is float32 for every one, so the embedder runs them alike
PRECISIONS = ("fp32", "fp16", "int8")
DEVICES = ("auto", "cpu", "cuda")
# Bounds on what a model file's metadata can make the embedder allocate (a file may come from anywhere):
# the input side (the export writes 8..4096 px), the embedding width (faiss's own limit), and the float32
# input of one onnxruntime call (a batch is split further when its images are large).
IMAGE_SIZE_RANGE = (1, 4096)
MAX_EMBEDDING_DIM = 1 << 20
MAX_BATCH_BYTES = 256 << 20


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
        raise UserError(
            "--device cuda: onnxruntime has no CUDAExecutionProvider here "
            "(install the 'gpu' extra: pip install -e '.[gpu]')"
        )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: CUDA-provider fallbacks are reported by us, once
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        sess = ort.InferenceSession(
            str(model) if isinstance(model, Path) else model, sess_options=opts, providers=providers
        )
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
        from simsiam_kit.data import to_rgb  # the one decoding rule (16-bit grayscale scaled, not clipped)

        return np.asarray(img if img.mode == "RGB" else to_rgb(img), dtype=np.uint8)
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise UserError(
            f"{what}: expected uint8 pixels (0-255), got dtype {a.dtype}; "
            "scale to 0-255 and cast to uint8, or pass a PIL image"
        )
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1)
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        if a.shape[-1] == 1:
            return np.repeat(a, 3, axis=-1)
        return a[..., :3]
    raise UserError(
        f"{what}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 array "
        f"(channels last), got shape {a.shape}"
    )


def _resize_crop(a: np.ndarray, size: int) -> np.ndarray:
    """The core's evaluation resize rule (:func:`simsiam_kit.image_settings.eval_resize_crop`): as is at
    size x size, else shorter side to round(size / 0.875) (PIL bilinear, antialiased) and a centre crop,
    the same function ``eval knn``/``eval linear`` features go through."""
    from simsiam_kit.image_settings import eval_resize_crop

    return eval_resize_crop(a, size)


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
    if (
        isinstance(images, np.ndarray)
        and images.ndim == 4
        and images.dtype == np.uint8
        and images.shape[1:] == (image_size, image_size, 3)
    ):
        batch = images  # fast path: an in-memory uint8 batch at the model's size
    else:
        items = list(images) if _is_batch(images) else [images]
        if not items:
            raise UserError("no images to embed")
        batch = np.stack([_resize_crop(_to_rgb_array(im, f"image {i}"), image_size) for i, im in enumerate(items)])
    x = batch.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


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
        raise UserError(
            f"{source}: not a simsiam-kit encoder (metadata_props lack {', '.join(missing) or 'format'}); "
            "export it with `simsiam-kit export onnx`"
        )
    meta = dict(raw)
    try:
        for k in ("image_size", "embedding_dim", "opset"):
            if k in meta:
                meta[k] = int(meta[k])
        for k in ("mean", "std"):
            meta[k] = [float(v) for v in json.loads(meta[k])]
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: malformed metadata_props ({str(e)[:200]})") from None
    lo, hi = IMAGE_SIZE_RANGE
    if not lo <= meta["image_size"] <= hi:
        raise UserError(f"{source}: metadata image_size={meta['image_size']} is outside {lo}..{hi} pixels")
    if not 1 <= meta["embedding_dim"] <= MAX_EMBEDDING_DIM:
        raise UserError(f"{source}: metadata embedding_dim={meta['embedding_dim']} is outside 1..{MAX_EMBEDDING_DIM}")
    if "precision" in meta and meta["precision"] not in PRECISIONS:
        raise UserError(
            f"{source}: metadata precision '{meta['precision']}' is not one this embedder runs "
            f"({', '.join(PRECISIONS)})"
        )
    if meta["channel_order"] != "RGB" or len(meta["mean"]) != 3 or len(meta["std"]) != 3:
        raise UserError(
            f"{source}: unsupported preprocessing metadata (channel_order={meta['channel_order']}, "
            f"mean={meta['mean']}, std={meta['std']})"
        )
    return meta


# --------------------------------------------------------------------------- embedder
class OnnxEmbedder:
    """Embed images with an exported simsiam-kit encoder.

    ``normalize=True`` (default) returns l2-normalised embeddings (cosine similarity = dot product),
    ``False`` the raw encoder output. ``device``: "auto" (CUDA when onnxruntime-gpu sees a GPU, else
    CPU), "cpu" or "cuda". ``threads``: onnxruntime intra-op threads (default: all cores).
    """

    def __init__(
        self, path, normalize: bool = True, device: str = "auto", batch_size: int = 64, threads: Optional[int] = None
    ):
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        self.session, self.provider = make_session(self.path, device, threads, source=str(self.path))
        self.image_size = self.meta["image_size"]
        self.mean, self.std = tuple(self.meta["mean"]), tuple(self.meta["std"])
        self.dim = self.meta["embedding_dim"]
        self.input_name, self.output_name = self.meta["input_name"], self.meta["output_name"]
        self._check_graph()
        self.normalize = normalize
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1 (got {batch_size})")
        self.batch_size = batch_size

    def _check_graph(self) -> None:
        """The graph's input and output agree with the metadata: input (N, 3, S, S), output (N, D), where
        the graph states the sizes (a dynamic axis is checked on the output of every run)."""
        inputs = self.session.get_inputs()
        names = [i.name for i in inputs]
        if names != [self.input_name]:
            raise UserError(f"{self.path}: graph inputs {names} do not match metadata input_name '{self.input_name}'")
        want = (None, 3, self.image_size, self.image_size)
        shape = inputs[0].shape
        if shape is not None and (
            len(shape) != 4 or any(isinstance(g, int) and w is not None and g != w for g, w in zip(shape, want))
        ):
            raise UserError(
                f"{self.path}: graph input '{self.input_name}' has shape {shape}, but the metadata "
                f"describe (N, 3, {self.image_size}, {self.image_size}) images"
            )
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if self.output_name not in outputs:
            raise UserError(
                f"{self.path}: graph outputs {list(outputs)} do not include metadata output_name '{self.output_name}'"
            )
        shape = outputs[self.output_name]
        if shape is not None and (len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != self.dim)):
            raise UserError(
                f"{self.path}: graph output '{self.output_name}' has shape {shape}; an encoder gives "
                f"(N, {self.dim}) embeddings (metadata embedding_dim={self.dim})"
            )

    def __repr__(self) -> str:
        return (
            f"OnnxEmbedder({str(self.path)!r}, arch={self.meta.get('arch')}, head={self.meta.get('head')}, "
            f"dim={self.dim}, image_size={self.image_size}, provider={self.provider})"
        )

    @property
    def runtime(self) -> str:
        """The runtime's name (``export.runtime_choice.RUNTIMES``): ``ort-int8`` for an int8 model, else
        ``ort-fp32``."""
        return "ort-int8" if self.meta.get("precision") == "int8" else "ort-fp32"

    def preprocess(self, images) -> np.ndarray:
        return preprocess(images, self.image_size, self.mean, self.std)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw encoder output for an already preprocessed float32 (N, 3, S, S) batch."""
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        out = np.asarray(out, dtype=np.float32)
        if out.shape != (len(x), self.dim):
            raise UserError(
                f"{self.path}: output '{self.output_name}' has shape {out.shape} for {len(x)} images; "
                f"an encoder gives ({len(x)}, {self.dim}) (metadata embedding_dim={self.dim})"
            )
        return check_finite_embeddings(out, f"{self.path}: output '{self.output_name}'")

    @property
    def chunk(self) -> int:
        """Images per onnxruntime call: ``batch_size``, fewer when their float32 input would exceed
        :data:`MAX_BATCH_BYTES` (at least one)."""
        per_image = 3 * self.image_size * self.image_size * 4
        return max(1, min(self.batch_size, MAX_BATCH_BYTES // per_image))

    def embed(self, images, normalize: Optional[bool] = None) -> np.ndarray:
        """float32 (N, D) embeddings of one image or a batch (PIL images, paths, uint8 arrays)."""
        if not _is_batch(images):
            images = [images]
        elif isinstance(images, tuple):
            images = list(images)
        n = len(images)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        step = self.chunk
        outs = [self.run(self.preprocess(images[s : s + step])) for s in range(0, n, step)]
        z = np.concatenate(outs)
        return l2_normalize(z) if (self.normalize if normalize is None else normalize) else z
