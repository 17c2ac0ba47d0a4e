from simsiam_kit.models.backbones import BACKBONES, build_backbone
from simsiam_kit.models.heads import PredictionHead, ProjectionHead
from simsiam_kit.models.simsiam import SimSiam, build_simsiam

__all__ = [
    "BACKBONES",
    "build_backbone",
    "ProjectionHead",
    "PredictionHead",
    "SimSiam",
    "build_simsiam",
]
