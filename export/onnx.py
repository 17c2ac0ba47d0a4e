"""Export a SimSiam encoder to ONNX, with metadata and a parity check against PyTorch.

The exported graph:

* input ``images``: float32 ``(N, 3, H, W)``, ``N`` dynamic, ``H = W = image_size``, RGB, pixels
  scaled to [0, 1] then normalised per channel with the ``mean`` / ``std`` in the metadata;
* output ``embeddings``: float32 ``(N, D)``, the raw encoder output (no l2 normalisation;
  :class:`export.embedder.OnnxEmbedder` normalises by default). ``--head backbone`` gives the pooled
  backbone features (D = the ``feature_dim`` of its entry in :mod:`simsiam_kit.models.backbones`),
  ``--head projector`` the projector output z (the ``f`` of the paper, D = ``proj_dim``).
* ``--fp16``: weights and arithmetic in float16, inputs and outputs still float32 (casts in the graph).
* ``--quantize int8``: the fp32 graph statically quantized by onnxruntime (QDQ: int8 weights, uint8
  activations, calibrated on the user's images), I/O still float32; the parity check of the fp32 graph
  is followed by an accuracy check (kNN top-1 within 0.5 points of fp32): :mod:`export.quantize`.

``metadata_props`` holds everything a consumer needs to preprocess (see :data:`METADATA_DOC`).
Like timm's ``utils/onnx.py``, the function checks the model (``onnx.checker``) and compares
onnxruntime against the PyTorch encoder before it returns; a model that fails the parity check (or,
for int8, the accuracy check) is not written, and the figures go to ``<output stem>.export.json``
either way. Both files are written atomically (:mod:`simsiam_kit.utils.io`), the model before the report,
so a report next to a model always describes it.

The steps of :func:`export_onnx`, each a function here: load the encoder (:mod:`export.encoder`), read
the check images, build the graph with its metadata (:func:`build_graph`), check parity
(:func:`parity_check`), quantize (:mod:`export.quantize`), write (:func:`write_export`). Options are one
:class:`OnnxExportOptions`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from simsiam_kit.config import DEFAULT_KNN_K
from simsiam_kit.errors import UserError
from simsiam_kit.export.embedder import FORMAT, decode_metadata, l2_normalize, make_session, preprocess
from simsiam_kit.export.encoder import HEADS, Encoder, EncoderNet, load_encoder
from simsiam_kit.export.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_CALIBRATION_METHOD,
    MAX_TOP1_DROP,
    AccuracyError,
    accuracy_check,
    accuracy_set,
    calibration_batch,
    check_options,
    load_calibration,
    metadata_json,
    quantization_facts,
    quantize_int8,
)
from simsiam_kit.image_settings import RESIZE_RULE
from simsiam_kit.models.backbones import BACKBONES, STEMS
from simsiam_kit.utils.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "Encoder",
    "EncoderNet",
    "OnnxExportOptions",
    "ParityError",
    "export_onnx",
    "load_encoder",
    "parity_check",
    "to_onnx",
]

INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
DEFAULT_OPSET = 18
# torch's dynamo exporter implements opset 18 and newer; for lower opsets it falls back to a version
# converter that fails on ResNets and silently keeps 18, so we refuse them. 23 is the newest opset the
# pinned onnxruntime (>= 1.18 supports up to 21; 1.2x up to 23) is known to run.
SUPPORTED_OPSETS = tuple(range(18, 24))
FP32_MAX_ABS_DIFF = 1e-4
FP16_MIN_COSINE = 0.999
PARITY_BATCHES = (1, 7)
DEFAULT_PARITY_DATA = "demo:val[:16]"

METADATA_DOC = {
    "format": f"'{FORMAT}'",
    "format_version": "'1'",
    "arch": " | ".join(BACKBONES),
    "stem": " | ".join(STEMS),
    "head": " | ".join(HEADS),
    "embedding_dim": "D, width of the output",
    "image_size": "H = W of the input",
    "mean": "JSON list, per-channel mean (RGB) subtracted after scaling pixels to [0, 1]",
    "std": "JSON list, per-channel std (RGB)",
    "channel_order": "'RGB'",
    "input_name": f"'{INPUT_NAME}'",
    "input_layout": "'NCHW' (float32, batch axis dynamic)",
    "input_scale": "'pixels / 255' (then (x - mean) / std)",
    "resize": "how other sizes are brought to image_size (the evaluation rule: image_settings.RESIZE_RULE)",
    "output_name": f"'{OUTPUT_NAME}'",
    "output_normalization": "'none' (raw features; OnnxEmbedder l2-normalises by default)",
    "precision": "fp32 | fp16 | int8 (weights and arithmetic; I/O is float32)",
    "calibration": "int8 only, JSON: format, weight/activation types, calibration method, data and image count",
    "accuracy_check": "int8 only, JSON: kNN top-1 of int8 and fp32 embeddings, difference, k, T, data",
    "opset": "default-domain opset",
    "source": "the weights the model was exported from",
    "producer_versions": "JSON: simsiam-kit, torch, onnx versions",
}


def _metadata(enc: Encoder, opset: int, precision: str) -> dict:
    import onnx

    import simsiam_kit

    return {
        "format": FORMAT,
        "format_version": "1",
        "arch": enc.arch,
        "stem": enc.stem,
        "head": enc.head,
        "embedding_dim": str(enc.embedding_dim),
        "image_size": str(enc.image_size),
        "mean": json.dumps(list(enc.mean)),
        "std": json.dumps(list(enc.std)),
        "channel_order": "RGB",
        "input_name": INPUT_NAME,
        "input_layout": "NCHW",
        "input_scale": "pixels / 255",
        "resize": RESIZE_RULE,
        "output_name": OUTPUT_NAME,
        "output_normalization": "none",
        "precision": precision,
        "opset": str(opset),
        "source": enc.source,
        "producer_versions": json.dumps(
            {
                "simsiam-kit": getattr(simsiam_kit, "__version__", "?"),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
            }
        ),
    }


def to_onnx(net: nn.Module, image_size: int, opset: int):
    """torch.onnx (dynamo) export to a ModelProto with a dynamic batch axis."""
    import logging
    import warnings

    dummy = torch.zeros(2, 3, image_size, image_size)
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                net,
                (dummy,),
                None,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
                dynamo=True,
                verbose=False,
            )
    except ImportError as e:
        raise UserError(f"ONNX export needs onnxscript ({e}); pip install onnxscript") from None
    except Exception as e:  # exporter failures are long; keep the first line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ONNX export failed at opset {opset}: {msg[:300]}") from None
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    return prog.model_proto


def default_opset(model) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)


def _compare(ref: np.ndarray, got: np.ndarray) -> dict:
    cos = (l2_normalize(ref) * l2_normalize(got)).sum(1)
    return {
        "batch": int(len(ref)),
        "max_abs_diff": float(np.abs(ref - got).max()),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_value": float(np.abs(ref).max()),
    }


def parity_check(
    net: nn.Module,
    session,
    image_size: int,
    mean,
    std,
    real_images: Optional[np.ndarray],
    fp16: bool,
    atol: float = FP32_MAX_ABS_DIFF,
    min_cosine: float = FP16_MIN_COSINE,
    batches=PARITY_BATCHES,
    seed: int = 0,
) -> dict:
    """onnxruntime vs the fp32 PyTorch encoder on random and real images at each batch size.

    fp32 export: passes when, in every check, the max absolute difference is <= ``atol`` x max(1, the
    largest |output| of PyTorch): an absolute 1e-4 for features up to 1, relative beyond, since fp32
    rounding grows with the values (a random-init ResNet-50's features are in the hundreds:
    docs/benchmarks.md, "Figures behind design choices"); fp16: when the cosine similarity of every embedding
    pair is >= ``min_cosine``. Both figures are reported either way.
    """
    ref_net = net
    rng = np.random.default_rng(seed)
    sets = {"random": rng.integers(0, 256, size=(max(batches), image_size, image_size, 3), dtype=np.uint8)}
    if real_images is not None and len(real_images):
        sets["real"] = real_images
    checks = []
    for name, imgs in sets.items():
        x_all = preprocess(imgs, image_size, mean, std)
        sizes = sorted(set(min(b, len(x_all)) for b in batches) | ({len(x_all)} if name == "real" else set()))
        for b in sizes:
            x = x_all[:b]
            with torch.no_grad():
                ref = ref_net(torch.from_numpy(x)).float().numpy()
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float32)
            if got.shape != ref.shape:
                raise UserError(f"parity check: onnxruntime output shape {got.shape} != PyTorch {ref.shape}")
            c = {"images": name, **_compare(ref, got)}
            c["tolerance"] = atol * max(1.0, c["max_abs_value"])
            checks.append(c)
    worst_abs = max(c["max_abs_diff"] for c in checks)
    worst_cos = min(c["min_cosine"] for c in checks)
    passed = worst_cos >= min_cosine if fp16 else all(c["max_abs_diff"] <= c["tolerance"] for c in checks)
    criterion = f"min cosine >= {min_cosine}" if fp16 else f"max abs diff <= {atol:g} x max(1, max |output|)"
    return {
        "criterion": criterion,
        "passed": bool(passed),
        "max_abs_diff": worst_abs,
        "min_cosine": worst_cos,
        "checks": checks,
    }


def _real_images(parity_data) -> Optional[np.ndarray]:
    if parity_data is None:
        return None
    if isinstance(parity_data, np.ndarray):
        return parity_data
    from simsiam_kit.data.datasets import load_dataset

    ds = load_dataset(str(parity_data))
    if ds.in_memory:
        return ds.images[:64]
    return [ds.load_pil(i) for i in range(min(len(ds), 64))]


class ParityError(UserError):
    """onnxruntime and PyTorch disagree beyond the tolerance; the model was not written."""


def _set_metadata(model, enc: Encoder, meta: dict) -> None:
    """metadata_props, producer and doc string; then onnx.checker and the embedder's own metadata reader."""
    import onnx

    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "simsiam-kit"
    model.doc_string = (
        f"SimSiam {enc.arch} encoder ({enc.head}, {meta['precision']}). Input '{INPUT_NAME}': float32 NCHW "
        f"(N, 3, {enc.image_size}, {enc.image_size}), RGB, (pixels/255 - mean)/std with mean="
        f"{list(enc.mean)} std={list(enc.std)}. Output '{OUTPUT_NAME}': float32 (N, "
        f"{enc.embedding_dim}), not normalised."
    )
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise UserError(f"exported model fails onnx.checker: {str(e)[:300]}") from None
    decode_metadata(meta, "the exported model")  # the embedder must be able to read what we wrote


@dataclass(frozen=True)
class OnnxExportOptions:
    """Everything ``export_onnx`` takes besides the weights and the output path (the ``export onnx`` flags).

    ``parity_data``: real images for the parity check (a dataset spec, a uint8 (N, H, W, 3) array, or None
    for random images only). ``quantize="int8"``: static int8 quantization of the checked fp32 graph,
    calibrated on ``calibration_images`` images of ``calibration_data`` (a dataset spec or a uint8 array)
    with ``calibration_method``, then the accuracy check on ``accuracy_data`` (a labelled dataset spec, or
    ``(uint8 images, labels)``) with ``max_top1_drop`` and ``knn_k`` (capped at the bank, half the images).
    """

    head: str = "backbone"
    image_size: Optional[int] = None
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    arch: Optional[str] = None
    stem: Optional[str] = None
    parity_data: Any = DEFAULT_PARITY_DATA
    device: str = "auto"
    atol: float = FP32_MAX_ABS_DIFF
    min_cosine: float = FP16_MIN_COSINE
    quantize: Optional[str] = None
    calibration_data: Any = None
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    calibration_method: str = DEFAULT_CALIBRATION_METHOD
    accuracy_data: Any = None
    max_top1_drop: float = MAX_TOP1_DROP
    knn_k: int = DEFAULT_KNN_K

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    def validate(self) -> None:
        """Impossible combinations and values, refused before anything is loaded."""
        check_options(
            self.quantize,
            self.fp16,
            self.calibration_data,
            self.accuracy_data,
            self.calibration_images,
            self.calibration_method,
        )
        if int(self.opset) not in SUPPORTED_OPSETS:
            raise UserError(
                f"unsupported opset {self.opset} (supported: {SUPPORTED_OPSETS[0]}-{SUPPORTED_OPSETS[-1]}; "
                "the torch exporter produces opset 18 or newer)"
            )


@dataclass
class CheckImages:
    """The images the checks run on, read before the export so a bad spec stops the command at once."""

    real: Optional[np.ndarray]  # parity check (None: random images only)
    calibration: Optional[tuple] = None  # int8: (preprocessed batch, facts)
    labelled: Optional[tuple] = None  # int8 accuracy check: (images, labels, description)

    @classmethod
    def read(cls, opts: OnnxExportOptions, enc: Encoder) -> "CheckImages":
        real = _real_images(opts.parity_data)
        if not opts.quantize:
            return cls(real)
        labelled = accuracy_set(opts.accuracy_data)
        calib = load_calibration(opts.calibration_data, opts.calibration_images, enc.image_size, enc.mean, enc.std)
        return cls(real, calib, labelled)


def build_graph(enc: Encoder, opts: OnnxExportOptions) -> tuple[Any, dict, float]:
    """The checked ModelProto with its metadata, the metadata, and the seconds the export took."""
    net = enc.module.half_precision() if opts.fp16 else enc.module
    t0 = time.perf_counter()
    model = to_onnx(net, enc.image_size, int(opts.opset))
    got_opset = default_opset(model)
    if got_opset != int(opts.opset):
        raise UserError(f"unsupported opset {opts.opset}: the exporter produced opset {got_opset}")
    meta = _metadata(enc, int(opts.opset), opts.precision)
    _set_metadata(model, enc, meta)
    return model, meta, time.perf_counter() - t0


def _check_parity(enc: Encoder, opts: OnnxExportOptions, session, provider: str, real, say) -> dict:
    say(
        f"parity check on onnxruntime {provider} vs PyTorch fp32 "
        f"({'random + real' if real is not None else 'random'} images, batches {', '.join(map(str, PARITY_BATCHES))})"
    )
    parity = parity_check(
        enc.module, session, enc.image_size, enc.mean, enc.std, real, opts.fp16, opts.atol, opts.min_cosine
    )
    for c in parity["checks"]:
        say(
            f"  {c['images']:6s} batch {c['batch']:3d}: max abs diff {c['max_abs_diff']:.2e}  "
            f"min cosine {c['min_cosine']:.7f}"
        )
    return parity


def _quantize_int8(
    enc: Encoder, opts: OnnxExportOptions, fp32_data: bytes, meta: dict, session32, images: CheckImages, output, say
) -> tuple[bytes, dict]:
    """int8 model bytes and the report's quantization and accuracy sections (:mod:`export.quantize`)."""
    (x, info), method = images.calibration, opts.calibration_method
    batch = calibration_batch(len(x))
    say(
        f"int8: calibrating on {info['images']} images of {info['data']} ({method}, batches of {batch}); "
        "QDQ, int8 per-channel weights, uint8 activations"
    )
    t0 = time.perf_counter()
    qmodel = quantize_int8(fp32_data, x, INPUT_NAME, method)
    quant_s = time.perf_counter() - t0
    facts = quantization_facts(info, method, batch)
    session8, _ = make_session(qmodel.SerializeToString(), opts.device, source=f"{output} (int8)")
    labelled = images.labelled
    say(f"accuracy check: kNN top-1 of int8 vs fp32 embeddings on {labelled[2]} ({len(labelled[1])} images)")
    acc = accuracy_check(
        session32,
        session8,
        labelled,
        enc.image_size,
        enc.mean,
        enc.std,
        INPUT_NAME,
        OUTPUT_NAME,
        opts.max_top1_drop,
        opts.knn_k,
    )
    summary = {k: acc[k] for k in ("fp32_top1", "int8_top1", "difference", "k", "temperature", "images", "data")}
    summary["cosine_mean"] = acc["cosine_int8_vs_fp32"]["mean"]
    qmeta = dict(
        meta,
        precision="int8",
        opset=str(default_opset(qmodel)),
        calibration=metadata_json(facts),
        accuracy_check=metadata_json(summary),
    )
    _set_metadata(qmodel, enc, qmeta)
    data = qmodel.SerializeToString()
    return data, {"metadata": qmeta, "quantization": {**facts, "seconds": round(quant_s, 2)}, "accuracy": acc}


def _report(weights, output: Path, enc: Encoder, opts: OnnxExportOptions, meta, provider, parity, real, seconds, data):
    parity_data = opts.parity_data
    return {
        "model": str(output),
        "weights": str(weights),
        "metadata": meta,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, enc.image_size, enc.image_size]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", enc.embedding_dim]},
        "onnx_checker": "passed",
        "provider": provider,
        "parity": parity,
        "parity_data": None
        if real is None
        else (str(parity_data) if not isinstance(parity_data, np.ndarray) else f"array {tuple(parity_data.shape)}"),
        "export_seconds": round(seconds, 2),
        "size_bytes": len(data),
    }


def write_export(output: Path, data: bytes, report_path: Path, report: dict, say: Callable[[str], None]) -> None:
    """A model that passed its checks: the model, then the report, each atomically. One that failed: the
    report only, then :class:`ParityError` or :class:`AccuracyError`."""
    parity, acc = report["parity"], report.get("accuracy")
    if not parity["passed"]:
        atomic_write_json(report_path, report)
        raise ParityError(
            f"parity check failed ({parity['criterion']}): max abs diff {parity['max_abs_diff']:.3e}, "
            f"min cosine {parity['min_cosine']:.6f}; model not written, figures in {report_path}"
        )
    if acc is not None:
        cos = acc["cosine_int8_vs_fp32"]
        say(
            f"  kNN top-1 (k={acc['k']}, T={acc['temperature']:g}, {acc['images']} images): fp32 "
            f"{acc['fp32_top1']:.2f}%, int8 {acc['int8_top1']:.2f}% ({acc['difference']:+.2f} points); "
            f"cosine int8 vs fp32 mean {cos['mean']:.4f}, min {cos['min']:.4f}"
        )
        if not acc["passed"]:
            atomic_write_json(report_path, report)
            raise AccuracyError(
                f"int8 accuracy check failed ({acc['criterion']}): kNN top-1 int8 {acc['int8_top1']:.2f}% vs "
                f"fp32 {acc['fp32_top1']:.2f}% ({acc['difference']:+.2f} points, {acc['images']} images of "
                f"{acc['data']}); model not written, figures in {report_path}"
            )
    atomic_write_bytes(output, data)
    atomic_write_json(report_path, report)
    passed = f"parity passed ({parity['criterion']})"
    if acc is not None:
        passed = f"parity of the fp32 graph and int8 accuracy check passed ({acc['criterion']})"
    say(f"{passed}; wrote {output} ({len(data) / 1e6:.1f} MB) and {report_path}")


def export_onnx(
    weights: str,
    output: Union[str, Path],
    options: Optional[OnnxExportOptions] = None,
    log: Optional[Callable[[str], None]] = None,
    **fields,
) -> dict:
    """Export ``weights`` (run dir, checkpoint, backbone.pt, ...) to ``output`` and return the report dict
    (also written to ``<output stem>.export.json``).

    ``options``: an :class:`OnnxExportOptions`; keyword ``fields`` set (or override) its fields, so
    ``export_onnx(w, out, head="projector", parity_data=None)`` works too. Raises :class:`ParityError`
    when the parity check fails and :class:`AccuracyError` when the int8 accuracy check fails (both
    :class:`UserError`; the model is not written, the report is).
    """
    opts = replace(options or OnnxExportOptions(), **fields)
    say = log or (lambda s: None)
    opts.validate()
    output = Path(output).expanduser()
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; give a file name such as {output / 'encoder.onnx'}")
    report_path = output.with_name(output.stem + ".export.json")
    enc = load_encoder(weights, opts.head, opts.image_size, opts.arch, opts.stem, log=say)
    images = CheckImages.read(opts, enc)
    say(
        f"exporting {enc.arch} ({enc.stem} stem) {enc.head} -> {enc.embedding_dim}-d embeddings, "
        f"{enc.image_size}px, opset {opts.opset}, {opts.precision}"
        + (f", then {opts.quantize}" if opts.quantize else "")
    )
    model, meta, seconds = build_graph(enc, opts)
    data = model.SerializeToString()
    session, provider = make_session(data, opts.device, source=str(output))
    parity = _check_parity(enc, opts, session, provider, images.real, say)
    report = _report(weights, output, enc, opts, meta, provider, parity, images.real, seconds, data)
    if opts.quantize and parity["passed"]:
        data, qreport = _quantize_int8(enc, opts, data, meta, session, images, output, say)
        report.update(qreport, size_bytes=len(data), fp32_size_bytes=report["size_bytes"])
        report["parity"]["graph"] = "the fp32 graph before quantization"
    write_export(output, data, report_path, report, say)
    return report
