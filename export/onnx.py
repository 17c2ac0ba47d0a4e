"""Export a SimSiam encoder to ONNX, with metadata and a parity check against PyTorch.

The exported graph:

* input ``images``: float32 ``(N, 3, H, W)``, ``N`` dynamic, ``H = W = image_size``, RGB, pixels
  scaled to [0, 1] then normalised per channel with the ``mean`` / ``std`` in the metadata;
* output ``embeddings``: float32 ``(N, D)``, the raw encoder output (no l2 normalisation;
  :class:`export.embedder.OnnxEmbedder` normalises by default). ``--head backbone`` gives the pooled
  ResNet features (D = 512 for ResNet-18/34, 2048 for ResNet-50/101), ``--head projector`` the
  projector output z (the ``f`` of the paper, D = ``proj_dim``).
* ``--fp16``: weights and arithmetic in float16, inputs and outputs still float32 (casts in the graph).
* ``--quantize int8``: the fp32 graph statically quantized by onnxruntime (QDQ: int8 weights, uint8
  activations, calibrated on the user's images), I/O still float32; the parity check of the fp32 graph
  is followed by an accuracy check (kNN top-1 within 0.5 points of fp32): :mod:`export.quantize`.

``metadata_props`` holds everything a consumer needs to preprocess (see :data:`METADATA_DOC`).
Like timm's ``utils/onnx.py``, the function checks the model (``onnx.checker``) and compares
onnxruntime against the PyTorch encoder before it returns; a model that fails the parity check (or,
for int8, the accuracy check) is not written, and the figures go to ``<output stem>.export.json``
either way.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from simsiam_kit.config import DEFAULT_KNN_K
from simsiam_kit.errors import UserError
from simsiam_kit.export.embedder import FORMAT, decode_metadata, l2_normalize, make_session, preprocess
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

INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
DEFAULT_OPSET = 18
# torch's dynamo exporter implements opset 18 and newer; for lower opsets it falls back to a version
# converter that fails on ResNets and silently keeps 18, so we refuse them. 23 is the newest opset the
# pinned onnxruntime (>= 1.18 supports up to 21; 1.2x up to 23) is known to run.
SUPPORTED_OPSETS = tuple(range(18, 24))
HEADS = ("backbone", "projector")
FP32_MAX_ABS_DIFF = 1e-4
FP16_MIN_COSINE = 0.999
PARITY_BATCHES = (1, 7)
DEFAULT_PARITY_DATA = "demo:val[:16]"

METADATA_DOC = {
    "format": f"'{FORMAT}'",
    "format_version": "'1'",
    "arch": "resnet18 | resnet34 | resnet50 | resnet101",
    "stem": "cifar | imagenet",
    "head": "backbone | projector",
    "embedding_dim": "D, width of the output",
    "image_size": "H = W of the input",
    "mean": "JSON list, per-channel mean (RGB) subtracted after scaling pixels to [0, 1]",
    "std": "JSON list, per-channel std (RGB)",
    "channel_order": "'RGB'",
    "input_name": f"'{INPUT_NAME}'",
    "input_layout": "'NCHW' (float32, batch axis dynamic)",
    "input_scale": "'pixels / 255' (then (x - mean) / std)",
    "resize": "how other sizes are brought to image_size (shorter side to image_size/0.875, centre crop)",
    "output_name": f"'{OUTPUT_NAME}'",
    "output_normalization": "'none' (raw features; OnnxEmbedder l2-normalises by default)",
    "precision": "fp32 | fp16 | int8 (weights and arithmetic; I/O is float32)",
    "calibration": "int8 only, JSON: format, weight/activation types, calibration method, data and image count",
    "accuracy_check": "int8 only, JSON: kNN top-1 of int8 and fp32 embeddings, difference, k, T, data",
    "opset": "default-domain opset",
    "source": "the weights the model was exported from",
    "producer_versions": "JSON: simsiam-kit, torch, onnx versions",
}


@dataclass
class Encoder:
    module: nn.Module
    arch: str
    stem: str
    head: str
    embedding_dim: int
    image_size: int
    mean: tuple
    std: tuple
    source: str


class _EncoderNet(nn.Module):
    """backbone [+ projector], optionally computing in float16 behind float32 I/O."""

    def __init__(self, backbone: nn.Module, projector: Optional[nn.Module], fp16: bool = False):
        super().__init__()
        self.backbone, self.projector, self.fp16 = backbone, projector, fp16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float16) if self.fp16 else images
        z = self.backbone(x)
        if self.projector is not None:
            z = self.projector(z)
        return z.float()


def _projector_from_checkpoint(weights: str, feature_dim: int) -> tuple[nn.Module, str]:
    """The projector of a full simsiam-kit checkpoint (a run dir's checkpoints/last.pt)."""
    from simsiam_kit.engine.checkpoint import CHECKPOINT_FORMAT, clean_state_dict, load_file
    from simsiam_kit.models.heads import ProjectionHead
    from simsiam_kit.weights import load_state_dict_checked

    p = Path(weights).expanduser()
    if p.is_dir():
        ck = p / "checkpoints" / "last.pt"
        if not ck.is_file():
            raise UserError(
                f"--head projector needs the projector weights, but {p} has no checkpoints/last.pt "
                "(backbone.pt holds the backbone only)"
            )
        p = ck
    obj = load_file(p)
    if not (isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT):
        raise UserError(
            f"{p}: --head projector needs a full simsiam-kit checkpoint (a run's checkpoints/last.pt); "
            "this file holds no projector (use --head backbone)"
        )
    sd = clean_state_dict(obj.get("model", {}))
    proj = {k[len("projector.") :]: v for k, v in sd.items() if k.startswith("projector.")}
    linears = sorted(
        (k for k, v in proj.items() if k.endswith(".weight") and v.ndim == 2), key=lambda k: int(k.split(".")[1])
    )
    if not linears:
        raise UserError(f"{p}: checkpoint has no projector weights (no 'projector.*' keys)")
    in_dim = proj[linears[0]].shape[1]
    if in_dim != feature_dim:
        raise UserError(f"{p}: projector input {in_dim} does not match the backbone width {feature_dim}")
    head = ProjectionHead(in_dim, proj[linears[0]].shape[0], proj[linears[-1]].shape[0], len(linears))
    load_state_dict_checked(head, proj, f"{p} (projector)")
    return head, str(p)


def load_encoder(
    weights: str,
    head: str = "backbone",
    image_size: Optional[int] = None,
    arch: Optional[str] = None,
    stem: Optional[str] = None,
) -> Encoder:
    """Backbone (and projector for ``head="projector"``) in eval mode, with its preprocessing facts (the core's
    one resolver: :func:`simsiam_kit.image_settings.resolve_image_settings`)."""
    from simsiam_kit.image_settings import resolve_image_settings
    from simsiam_kit.weights import is_random, load_backbone

    if head not in HEADS:
        raise UserError(f"unknown head '{head}' (available: {', '.join(HEADS)})")
    if head == "projector" and is_random(weights):
        raise UserError("--head projector needs trained weights (a run directory or checkpoint), not 'random'")
    lb = load_backbone(str(weights), arch=arch, stem=stem)
    backbone = lb.model.eval()
    feat_dim = int(backbone.feature_dim)
    projector, source = None, lb.source
    if head == "projector":
        projector, source = _projector_from_checkpoint(str(weights), feat_dim)
        projector.eval()
        dim = int(projector.net[-2].out_features)
    else:
        dim = feat_dim
    # option > weights metadata > run config > default (32 px CIFAR stem, 224 px ImageNet stem; ImageNet mean/std)
    img = resolve_image_settings(
        option={"image_size": image_size}, weights=lb.weights_settings, config=lb.config_settings, stem=lb.stem
    )
    return Encoder(
        _EncoderNet(backbone, projector).eval(), lb.arch, lb.stem, head, dim, img.image_size, img.mean, img.std, source
    )


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
        "resize": "as is at image_size x image_size; otherwise shorter side to round(image_size / 0.875) "
        "(bilinear), centre crop image_size",
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


def _to_onnx(net: nn.Module, image_size: int, opset: int):
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


def _default_opset(model) -> int:
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
    rounding grows with the values (a random-init ResNet-50's features reach ~370 and differ by 3.6e-4 at
    cosine 1.0); fp16: when the cosine similarity of every embedding pair is >= ``min_cosine``. Both figures
    are reported either way.
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


def _quantize_int8(
    enc: Encoder,
    fp32_data: bytes,
    meta: dict,
    session32,
    calib: tuple,
    labelled: tuple,
    method: str,
    max_top1_drop: float,
    knn_k: int,
    device: str,
    output: Path,
    say: Callable[[str], None],
) -> tuple[bytes, dict]:
    """int8 model bytes and the report's quantization and accuracy sections (:mod:`export.quantize`)."""
    x, info = calib
    batch = calibration_batch(len(x))
    say(
        f"int8: calibrating on {info['images']} images of {info['data']} ({method}, batches of {batch}); "
        "QDQ, int8 per-channel weights, uint8 activations"
    )
    t0 = time.perf_counter()
    qmodel = quantize_int8(fp32_data, x, INPUT_NAME, method)
    quant_s = time.perf_counter() - t0
    facts = quantization_facts(info, method, batch)
    session8, _ = make_session(qmodel.SerializeToString(), device, source=f"{output} (int8)")
    say(f"accuracy check: kNN top-1 of int8 vs fp32 embeddings on {labelled[2]} ({len(labelled[1])} images)")
    acc = accuracy_check(
        session32, session8, labelled, enc.image_size, enc.mean, enc.std, INPUT_NAME, OUTPUT_NAME, max_top1_drop, knn_k
    )
    summary = {k: acc[k] for k in ("fp32_top1", "int8_top1", "difference", "k", "temperature", "images", "data")}
    summary["cosine_mean"] = acc["cosine_int8_vs_fp32"]["mean"]
    qmeta = dict(
        meta,
        precision="int8",
        opset=str(_default_opset(qmodel)),
        calibration=metadata_json(facts),
        accuracy_check=metadata_json(summary),
    )
    _set_metadata(qmodel, enc, qmeta)
    data = qmodel.SerializeToString()
    return data, {"metadata": qmeta, "quantization": {**facts, "seconds": round(quant_s, 2)}, "accuracy": acc}


def export_onnx(
    weights: str,
    output: Union[str, Path],
    head: str = "backbone",
    image_size: Optional[int] = None,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    arch: Optional[str] = None,
    stem: Optional[str] = None,
    parity_data=DEFAULT_PARITY_DATA,
    device: str = "auto",
    atol: float = FP32_MAX_ABS_DIFF,
    min_cosine: float = FP16_MIN_COSINE,
    log: Optional[Callable[[str], None]] = None,
    quantize: Optional[str] = None,
    calibration_data=None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
    accuracy_data=None,
    max_top1_drop: float = MAX_TOP1_DROP,
    knn_k: int = DEFAULT_KNN_K,
) -> dict:
    """Export ``weights`` (run dir, checkpoint, backbone.pt, ...) to ``output`` and return a report dict.

    ``parity_data``: real images for the parity check (a dataset spec, a uint8 (N, H, W, 3) array, or
    None for random images only). Raises :class:`ParityError` (a :class:`UserError`) when the parity
    check fails; the report is written to ``<output stem>.export.json`` in both cases.

    ``quantize="int8"``: static int8 quantization of the checked fp32 graph (:mod:`export.quantize`),
    calibrated on ``calibration_images`` images of ``calibration_data`` (a dataset spec or a uint8
    (N, H, W, 3) array) with ``calibration_method``, then the accuracy check on ``accuracy_data`` (a
    labelled dataset spec, or ``(uint8 images, labels)``): raises :class:`AccuracyError` (model not
    written) when the int8 kNN top-1 is more than ``max_top1_drop`` points below fp32. ``knn_k``: the
    check's k (default the pretraining monitor's 200; capped at the bank, half the labelled images).
    """

    from simsiam_kit.utils.io import atomic_write_json

    say = log or (lambda s: None)
    check_options(quantize, fp16, calibration_data, accuracy_data, calibration_images, calibration_method)
    if int(opset) not in SUPPORTED_OPSETS:
        raise UserError(
            f"unsupported opset {opset} (supported: {SUPPORTED_OPSETS[0]}-{SUPPORTED_OPSETS[-1]}; "
            "the torch exporter produces opset 18 or newer)"
        )
    output = Path(output).expanduser()
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; give a file name such as {output / 'encoder.onnx'}")
    report_path = output.with_name(output.stem + ".export.json")
    enc = load_encoder(weights, head, image_size, arch, stem)
    real = _real_images(parity_data)
    if quantize:  # read both sets before the export, so a bad one stops the command at once
        labelled = accuracy_set(accuracy_data)
        calib = load_calibration(calibration_data, calibration_images, enc.image_size, enc.mean, enc.std)
    net = enc.module
    if fp16:
        net = _EncoderNet(enc.module.backbone, enc.module.projector, fp16=True)
        import copy

        net = copy.deepcopy(net).half().eval()
    say(
        f"exporting {enc.arch} ({enc.stem} stem) {enc.head} -> {enc.embedding_dim}-d embeddings, "
        f"{enc.image_size}px, opset {opset}, {'fp16' if fp16 else 'fp32'}" + (f", then {quantize}" if quantize else "")
    )
    t0 = time.perf_counter()
    model = _to_onnx(net, enc.image_size, int(opset))
    got_opset = _default_opset(model)
    if got_opset != int(opset):
        raise UserError(f"unsupported opset {opset}: the exporter produced opset {got_opset}")
    meta = _metadata(enc, int(opset), "fp16" if fp16 else "fp32")
    _set_metadata(model, enc, meta)
    export_s = time.perf_counter() - t0

    data = model.SerializeToString()
    session, provider = make_session(data, device, source=str(output))
    say(
        f"parity check on onnxruntime {provider} vs PyTorch fp32 "
        f"({'random + real' if real is not None else 'random'} images, batches {', '.join(map(str, PARITY_BATCHES))})"
    )
    parity = parity_check(enc.module, session, enc.image_size, enc.mean, enc.std, real, fp16, atol, min_cosine)
    for c in parity["checks"]:
        say(
            f"  {c['images']:6s} batch {c['batch']:3d}: max abs diff {c['max_abs_diff']:.2e}  "
            f"min cosine {c['min_cosine']:.7f}"
        )
    report = {
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
        "export_seconds": round(export_s, 2),
        "size_bytes": len(data),
    }
    if quantize and parity["passed"]:
        data, qreport = _quantize_int8(
            enc, data, meta, session, calib, labelled, calibration_method, max_top1_drop, knn_k, device, output, say
        )
        report.update(qreport, size_bytes=len(data), fp32_size_bytes=report["size_bytes"])
        report["parity"]["graph"] = "the fp32 graph before quantization"
    atomic_write_json(report_path, report)
    if not parity["passed"]:
        raise ParityError(
            f"parity check failed ({parity['criterion']}): max abs diff {parity['max_abs_diff']:.3e}, "
            f"min cosine {parity['min_cosine']:.6f}; model not written, figures in {report_path}"
        )
    acc = report.get("accuracy")
    if acc is not None:
        cos = acc["cosine_int8_vs_fp32"]
        say(
            f"  kNN top-1 (k={acc['k']}, T={acc['temperature']:g}, {acc['images']} images): fp32 "
            f"{acc['fp32_top1']:.2f}%, int8 {acc['int8_top1']:.2f}% ({acc['difference']:+.2f} points); "
            f"cosine int8 vs fp32 mean {cos['mean']:.4f}, min {cos['min']:.4f}"
        )
        if not acc["passed"]:
            raise AccuracyError(
                f"int8 accuracy check failed ({acc['criterion']}): kNN top-1 int8 {acc['int8_top1']:.2f}% vs "
                f"fp32 {acc['fp32_top1']:.2f}% ({acc['difference']:+.2f} points, {acc['images']} images of "
                f"{acc['data']}); model not written, figures in {report_path}"
            )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    passed = f"parity passed ({parity['criterion']})"
    if acc is not None:
        passed = f"parity of the fp32 graph and int8 accuracy check passed ({acc['criterion']})"
    say(f"{passed}; wrote {output} ({len(data) / 1e6:.1f} MB) and {report_path}")
    return report
