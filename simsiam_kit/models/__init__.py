"""Models: backbone entries (:mod:`.backbones`, :mod:`.resnet`), the projection and prediction heads, SimSiam.

The backbone entries and the factory load without torch (config validation asks them); the heads and
SimSiam import torch, so they are loaded on first use.
"""

from simsiam_kit.models.backbones import (
    BACKBONES,
    STEMS,
    BackboneEntry,
    Stem,
    build_backbone,
    check_buildable,
    get_backbone_entry,
    infer_arch,
    infer_stem,
)

__all__ = [
    "BACKBONES",
    "STEMS",
    "BackboneEntry",
    "Stem",
    "build_backbone",
    "check_buildable",
    "get_backbone_entry",
    "infer_arch",
    "infer_stem",
    "ProjectionHead",
    "PredictionHead",
    "SimSiam",
    "build_simsiam",
]

_LAZY = {
    "ProjectionHead": "simsiam_kit.models.heads",
    "PredictionHead": "simsiam_kit.models.heads",
    "SimSiam": "simsiam_kit.models.simsiam",
    "build_simsiam": "simsiam_kit.models.simsiam",
}


def __getattr__(name):
    if name in _LAZY:  # lazy: keeps `from simsiam_kit.models import BACKBONES` free of torch
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
