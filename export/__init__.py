"""Export of pretrained encoders, one family around one encoder loader (detectron2 ``export/``):

* :mod:`simsiam_kit.export.encoder`: :func:`load_encoder`, the backbone (+ projector) every format starts from;
* :mod:`simsiam_kit.export.onnx`: :func:`export_onnx` with :class:`OnnxExportOptions` (graph + metadata +
  parity check; int8 through :mod:`simsiam_kit.export.quantize`);
* :mod:`simsiam_kit.export.detectron2`: :func:`export_detectron2` (a ``.pkl`` for ``MODEL.WEIGHTS``);
* :mod:`simsiam_kit.export.embedder`: :class:`OnnxEmbedder`, the runtime of an exported model (numpy only;
  onnxruntime is imported when a model is opened);
* :mod:`simsiam_kit.export.runtime_choice`: :func:`open_embedder`, the fastest runtime of a model on this
  machine (ORT int8 / fp32, torch bf16 + channels_last), measured on the first batch and cached.

A new format is one module here beside these and one command in :mod:`simsiam_kit.cli.export`.
"""

from simsiam_kit.export.embedder import OnnxEmbedder, read_metadata

__all__ = [
    "OnnxEmbedder",
    "read_metadata",
    "export_onnx",
    "OnnxExportOptions",
    "load_encoder",
    "export_detectron2",
    "open_embedder",
]

_LAZY = {
    "export_onnx": "simsiam_kit.export.onnx",
    "OnnxExportOptions": "simsiam_kit.export.onnx",
    "load_encoder": "simsiam_kit.export.encoder",
    "export_detectron2": "simsiam_kit.export.detectron2",
    "open_embedder": "simsiam_kit.export.runtime_choice",
}


def __getattr__(name):
    if name in _LAZY:  # lazy: keeps `from simsiam_kit.export import OnnxEmbedder` free of torch
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
