"""int8 static quantization of an exported encoder, calibrated on the user's images, with an accuracy check.

``export_onnx(..., quantize="int8")`` (``simsiam-kit export onnx --quantize int8``) exports the fp32
graph as usual (its parity check against PyTorch included), then:

1. **calibrates** on ``calibration_data``: up to ``calibration_images`` (default
   :data:`DEFAULT_CALIBRATION_IMAGES`) images evenly spaced over the dataset spec, preprocessed exactly
   as :class:`~simsiam_kit.export.embedder.OnnxEmbedder` does (the metadata's resize, mean and std), fed
   to onnxruntime in equal batches of at most :data:`CALIBRATION_BATCH`;
2. **quantizes** with ``onnxruntime.quantization.quantize_static`` after ``quant_pre_process`` (shape
   inference, graph clean-up): QDQ format, weights int8 per output channel (symmetric), activations
   uint8 (asymmetric) with ranges from the calibration method: ``minmax`` by default, ``percentile``
   (99.999) on request. onnxruntime's ``entropy`` is not offered: through ``quantize_static`` it searches
   a single candidate range, MinMax's, and gave the same embeddings. uint8 activations with int8 weights
   is the pair onnxruntime's x86 int8 kernels (AVX512-VNNI) run fastest; int8 activations ran several
   times slower here. No node is excluded: leaving the first conv in float did not change the accuracy.
   (The figures: ``variants`` in ``benchmarks/results/embed_throughput.json``, docs/export.md.)
3. **checks accuracy** instead of parity (an int8 model does not match fp32 to 1e-4, by design): weighted
   kNN top-1 (k = 200, T = 0.1, the pretraining monitor's defaults, with the toolkit's one classifier
   :func:`simsiam_kit.retrieval.knn.knn_classify`) of the int8 embeddings and of the fp32 graph's
   embeddings on ``accuracy_data``, a labelled dataset spec split two-fold (even rows are the bank for
   odd-row queries and the other way round, so every image is a query once). The int8 model passes when
   its top-1 is at most ``max_top1_drop`` (default 0.5) points below fp32; otherwise it is not written.

Nothing here imports torch at module level; :func:`check_options` is cheap, so the command can refuse
bad combinations before the export starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from simsiam_kit.config import DEFAULT_KNN_K, DEFAULT_KNN_TEMPERATURE
from simsiam_kit.errors import UserError
from simsiam_kit.export.embedder import l2_normalize, preprocess

QUANTIZE_CHOICES = ("int8",)
CALIBRATION_METHODS = ("minmax", "percentile")
DEFAULT_CALIBRATION_METHOD = "minmax"
DEFAULT_CALIBRATION_IMAGES = 300
MIN_CALIBRATION_IMAGES = 32
CALIBRATION_BATCH = 32
MIN_ACCURACY_IMAGES = 20
MAX_TOP1_DROP = 0.5  # points of kNN top-1 the int8 model may lose against the fp32 graph
EMBED_BATCH = 64
QUANT_FORMAT = "QDQ"
WEIGHT_TYPE, ACTIVATION_TYPE = "int8", "uint8"
PERCENTILE = 99.999  # onnxruntime's default for the percentile method
HISTOGRAM_MEMORY_FACTOR = 1.5  # the kept activations, plus the per-tensor arrays the histogram collector builds


class AccuracyError(UserError):
    """The int8 model's kNN top-1 is further below fp32 than allowed; the model was not written."""


def check_options(
    quantize: Optional[str],
    fp16: bool = False,
    calibration_data=None,
    accuracy_data=None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
) -> None:
    """Refuse impossible combinations before anything is loaded (no torch, no data reading)."""
    if quantize is None:
        given = [o for o, v in (("--calibration-data", calibration_data), ("--accuracy-data", accuracy_data)) if v]
        if given:
            raise UserError(f"{' and '.join(given)} apply to --quantize int8 only (add --quantize int8)")
        return
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize {quantize}: unknown (available: {', '.join(QUANTIZE_CHOICES)})")
    if fp16:
        raise UserError(
            "--quantize int8 and --fp16 exclude each other: int8 quantizes the fp32 graph (use one or the other)"
        )
    if calibration_method not in CALIBRATION_METHODS:
        raise UserError(
            f"--calibration-method {calibration_method}: unknown (available: {', '.join(CALIBRATION_METHODS)})"
        )
    if calibration_images < MIN_CALIBRATION_IMAGES:
        raise UserError(f"--calibration-images {calibration_images}: at least {MIN_CALIBRATION_IMAGES} are needed")
    if calibration_data is None:
        raise UserError(
            "--quantize int8 needs --calibration-data SPEC: a few hundred of your own images (dataset spec), "
            "to set the int8 ranges"
        )
    if accuracy_data is None:
        raise UserError(
            "--quantize int8 needs --accuracy-data SPEC: labelled images (dataset spec) for the kNN accuracy "
            "check that replaces the parity check"
        )


def _describe(data) -> str:
    return str(data) if not isinstance(data, np.ndarray) else f"array {tuple(data.shape)}"


def _dataset(spec, option: str):
    from simsiam_kit.data.datasets import load_dataset

    try:
        return load_dataset(str(spec))
    except UserError as e:
        raise UserError(f"{option} {spec}: {e}") from None


def _images(ds, idx: np.ndarray):
    """Rows ``idx`` of a dataset as something :func:`preprocess` takes (uint8 arrays or file paths)."""
    if ds.in_memory:
        return ds.images[idx]
    return [ds.files[i] for i in idx]


def _preprocessed(images, image_size: int, mean, std, batch: int = EMBED_BATCH):
    for s in range(0, len(images), batch):
        yield preprocess(images[s : s + batch], image_size, mean, std)


def load_calibration(data, count: int, image_size: int, mean, std) -> tuple[np.ndarray, dict]:
    """``count`` images evenly spaced over ``data`` (a dataset spec or a uint8 (N, H, W, 3) array),
    preprocessed as the embedder does: float32 (n, 3, S, S), and what was used."""
    if isinstance(data, np.ndarray):
        images, n_avail, what = data, len(data), _describe(data)
    else:
        ds = _dataset(data, "--calibration-data")
        images, n_avail, what = ds, len(ds), str(data)
    if n_avail < MIN_CALIBRATION_IMAGES:
        raise UserError(
            f"--calibration-data {what}: {n_avail} images, int8 calibration needs at least {MIN_CALIBRATION_IMAGES}"
        )
    n = min(int(count), n_avail)
    idx = np.unique(np.linspace(0, n_avail - 1, n).round().astype(np.int64))
    picked = images[idx] if isinstance(images, np.ndarray) else _images(images, idx)
    x = np.concatenate(list(_preprocessed(picked, image_size, mean, std)))
    return x, {"data": what, "available": int(n_avail), "images": int(len(x)), "selection": "evenly spaced"}


def accuracy_set(data) -> tuple[object, np.ndarray, str]:
    """Labelled images for the accuracy check: (images for :func:`preprocess`, int labels, description)."""
    if isinstance(data, tuple):  # (uint8 images, labels), for the Python API and tests
        images, labels = data
        labels, what = np.asarray(labels, dtype=np.int64), f"array {tuple(np.shape(images))}"
    else:
        ds = _dataset(data, "--accuracy-data")
        if not ds.has_labels:
            raise UserError(
                f"--accuracy-data {data}: images without labels; the int8 accuracy check (kNN top-1) needs a "
                "labelled set (an ImageFolder tree, a .npz with 'labels', demo, cifar10, ...)"
            )
        images, labels, what = (ds.images if ds.in_memory else list(ds.files)), ds.labels, str(data)
    if len(labels) < MIN_ACCURACY_IMAGES:
        raise UserError(
            f"--accuracy-data {what}: {len(labels)} labelled images, the accuracy check needs at least "
            f"{MIN_ACCURACY_IMAGES} (1,000 or more for a fine figure: one image is 100/N points)"
        )
    if len(np.unique(labels)) < 2:
        raise UserError(f"--accuracy-data {what}: all images have one label; kNN accuracy needs two classes or more")
    return images, labels, what


def embed_all(session, images, image_size: int, mean, std, input_name: str, output_name: str) -> np.ndarray:
    """Raw embeddings of every image through an onnxruntime session, in batches of :data:`EMBED_BATCH`."""
    outs = [
        np.asarray(session.run([output_name], {input_name: x})[0], dtype=np.float32)
        for x in _preprocessed(images, image_size, mean, std)
    ]
    return np.concatenate(outs)


def knn_top1_two_fold(z: np.ndarray, labels: np.ndarray, k: int, temperature: float) -> tuple[float, int]:
    """kNN top-1 (%) with every image a query once: even rows vote for odd-row queries and the other way
    round; returns (top-1, the k used: capped at the smaller bank, as the pretraining monitor does)."""
    import torch

    from simsiam_kit.retrieval.knn import knn_classify

    z_t, y_t = torch.from_numpy(np.ascontiguousarray(z)), torch.from_numpy(np.asarray(labels, dtype=np.int64))
    num_classes = int(y_t.max()) + 1
    k_used = min(int(k), len(z) // 2)
    correct = 0
    for bank, query in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))):
        pred, _ = knn_classify(z_t[bank], y_t[bank], z_t[query], k_used, temperature, num_classes)
        correct += int((pred.cpu() == y_t[query]).sum())
    return 100.0 * correct / len(z), k_used


def cosine_stats(ref: np.ndarray, got: np.ndarray) -> dict:
    cos = (l2_normalize(ref) * l2_normalize(got)).sum(1)
    return {
        "mean": float(cos.mean()),
        "min": float(cos.min()),
        "p01": float(np.percentile(cos, 1)),
        "median": float(np.median(cos)),
    }


def accuracy_check(
    fp32_session,
    int8_session,
    labelled: tuple,
    image_size: int,
    mean,
    std,
    input_name: str,
    output_name: str,
    max_top1_drop: float = MAX_TOP1_DROP,
    k: int = DEFAULT_KNN_K,
    temperature: float = DEFAULT_KNN_TEMPERATURE,
) -> dict:
    """kNN top-1 of the int8 and the fp32 embeddings of ``data`` (see the module docstring) and the cosine
    similarity between the two; ``passed`` when int8 is at most ``max_top1_drop`` points below fp32.
    ``labelled``: what :func:`accuracy_set` returns."""
    images, labels, what = labelled
    t0 = time.perf_counter()
    z32 = embed_all(fp32_session, images, image_size, mean, std, input_name, output_name)
    z8 = embed_all(int8_session, images, image_size, mean, std, input_name, output_name)
    top32, k_used = knn_top1_two_fold(z32, labels, k, temperature)
    top8, _ = knn_top1_two_fold(z8, labels, k, temperature)
    diff = top8 - top32
    return {
        "criterion": f"int8 kNN top-1 >= fp32 top-1 - {max_top1_drop:g} points",
        "passed": bool(diff >= -float(max_top1_drop) - 1e-9),  # 1e-9: 21.45 - 21.95 is -0.50000000000004
        "data": what,
        "images": int(len(labels)),
        "protocol": "two-fold: even rows are the bank of odd-row queries and vice versa (every image a query once)",
        "k": int(k_used),
        "temperature": float(temperature),
        "fp32_top1": top32,
        "int8_top1": top8,
        "difference": diff,
        "max_top1_drop": float(max_top1_drop),
        "points_per_image": 100.0 / len(labels),
        "cosine_int8_vs_fp32": cosine_stats(z32, z8),
        "seconds": round(time.perf_counter() - t0, 2),
    }


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed images, in equal batches (the entropy and
    percentile histograms need arrays of one shape)."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int):
        self.x, self.input_name, self.batch, self.i = x, input_name, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        b = self.x[self.i : self.i + self.batch]
        self.i += self.batch
        return {self.input_name: b}

    def rewind(self):
        self.i = 0


def calibration_batch(n: int, most: int = CALIBRATION_BATCH) -> int:
    """The largest batch <= ``most`` that divides ``n``, so every calibration image is used in equal batches."""
    return max(b for b in range(1, min(most, n) + 1) if n % b == 0)


def activation_bytes_per_image(model_path) -> int:
    """float32 bytes of every node output for one image, from the shapes shape inference stored (the batch axis
    counted as 1; unknown sizes count as 1, so this is a lower bound)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    produced = {o for n in m.graph.node for o in n.output}
    total = 0
    for vi in list(m.graph.value_info) + list(m.graph.output):
        t = vi.type.tensor_type
        if vi.name in produced and t.elem_type == onnx.TensorProto.FLOAT:
            total += 4 * int(np.prod([d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]))
    return total


def available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_histogram_memory(pre_model, n_images: int, method: str) -> None:
    """onnxruntime's histogram calibrators (percentile) keep every activation of every calibration image in
    memory before building histograms (MinMax reduces batch by batch): refuse what would not fit, instead of
    letting the kernel kill the process."""
    avail = available_memory()
    if method == "minmax" or avail is None:
        return
    per_image = activation_bytes_per_image(pre_model)
    need = int(per_image * n_images * HISTOGRAM_MEMORY_FACTOR)
    if need > 0.8 * avail:
        fits = int(0.8 * avail / (per_image * HISTOGRAM_MEMORY_FACTOR))
        instead = f"--calibration-images {fits} or fewer, or " if fits >= MIN_CALIBRATION_IMAGES else ""
        raise UserError(
            f"--calibration-method {method} keeps the activations of all {n_images} calibration images in memory "
            f"(about {need / 2**30:.1f} GiB for this model; {avail / 2**30:.1f} GiB available): use "
            f"{instead}--calibration-method minmax"
        )


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization prints progress and logs advice at INFO/WARNING; keep the command's output ours."""
    lg = logging.getLogger()
    level = lg.level
    try:
        lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.setLevel(level)


def quantize_int8(
    fp32_model: bytes,
    calib: np.ndarray,
    input_name: str,
    method: str = DEFAULT_CALIBRATION_METHOD,
    exclude_nodes: Sequence[str] = (),
    activation_type: str = ACTIVATION_TYPE,
    quant_format: str = "qdq",
    per_channel: bool = True,
):
    """Static int8 quantization (see the module docstring) of a serialised fp32 model: an int8 ModelProto.

    ``exclude_nodes``: node names of the fp32 graph left in float; ``activation_type``: "uint8" (the
    default, fastest here) or "int8"; ``quant_format`` "qdq" (the default) or "qoperator" (QLinearConv
    nodes) and ``per_channel=False`` (one weight scale per tensor): the alternatives measured by
    ``benchmarks/embed_throughput.py``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": (CalibrationMethod.MinMax, {}),
        # not offered: quantize_static builds it with 128 histogram bins for 128 quantized bins, which leaves the
        # KL search one candidate, the full range, so it gives MinMax's ranges (measured: the same embeddings);
        # kept for the benchmark's comparison
        "entropy": (CalibrationMethod.Entropy, {}),
        "percentile": (CalibrationMethod.Percentile, {"CalibPercentile": PERCENTILE}),
    }
    calib_method, extra = methods[method]
    with tempfile.TemporaryDirectory(prefix="simsiam-kit-quant-") as d:
        src, pre, out = Path(d) / "fp32.onnx", Path(d) / "pre.onnx", Path(d) / "int8.onnx"
        src.write_bytes(fp32_model)
        try:
            with _quiet():
                quant_pre_process(str(src), str(pre))
            check_histogram_memory(pre, len(calib), method)
            with _quiet():
                quantize_static(
                    str(pre),
                    str(out),
                    _Reader(calib, input_name, calibration_batch(len(calib))),
                    quant_format={"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[quant_format],
                    per_channel=per_channel,
                    activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activation_type],
                    weight_type=QuantType.QInt8,
                    calibrate_method=calib_method,
                    nodes_to_exclude=list(exclude_nodes),
                    extra_options=extra,
                )
        except UserError:
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"int8 quantization failed: {msg[:300]}") from None
        return onnx.load(str(out))


def quantization_facts(calib_info: dict, method: str, batch: int, exclude_nodes: Sequence[str] = ()) -> dict:
    """What the metadata and the report say about the quantization."""
    return {
        "format": QUANT_FORMAT,
        "weights": f"{WEIGHT_TYPE}, per output channel, symmetric",
        "activations": f"{ACTIVATION_TYPE}, per tensor, asymmetric",
        "calibration_method": method + (f" ({PERCENTILE})" if method == "percentile" else ""),
        "calibration_data": calib_info["data"],
        "calibration_images": calib_info["images"],
        "calibration_selection": calib_info["selection"],
        "calibration_batch": int(batch),
        "preprocessing": "as the embedder: the metadata's resize, mean and std",
        "excluded_nodes": list(exclude_nodes),
        "tool": "onnxruntime.quantization (quant_pre_process + quantize_static)",
    }


def metadata_json(d: dict) -> str:
    return json.dumps(d, separators=(",", ":"))
