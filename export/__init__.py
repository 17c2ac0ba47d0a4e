"""Export of pretrained encoders: ONNX with metadata and a parity check, onnxruntime embedder.

``export_onnx`` lives in :mod:`simsiam_kit.export.onnx` (imports torch); ``OnnxEmbedder`` in
:mod:`simsiam_kit.export.embedder` (numpy only; onnxruntime is imported when a model is opened).
"""

from simsiam_kit.export.embedder import OnnxEmbedder, read_metadata

__all__ = ["OnnxEmbedder", "read_metadata", "export_onnx"]


def __getattr__(name):
    if name == "export_onnx":  # lazy: keeps `from simsiam_kit.export import OnnxEmbedder` free of torch
        from simsiam_kit.export.onnx import export_onnx

        return export_onnx
    raise AttributeError(name)
