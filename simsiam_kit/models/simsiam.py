"""SimSiam = backbone + projector (together the encoder f) + predictor h."""

from __future__ import annotations

import torch
import torch.nn as nn

from simsiam_kit.models.backbones import build_backbone
from simsiam_kit.models.heads import PredictionHead, ProjectionHead


class SimSiam(nn.Module):
    """Chen & He, "Exploring Simple Siamese Representation Learning" (CVPR 2021).

    ``forward(x1, x2)`` returns ``p1, p2, z1, z2`` where ``z = projector(backbone(x))`` and
    ``p = predictor(z)``. The two views go through the network separately so that BatchNorm
    statistics are per view, as in the official code. With ``predictor=False`` (the Table 1 ablation)
    ``p`` is ``z`` itself. The stop-gradient lives in the loss (:mod:`simsiam_kit.losses`).
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor if predictor is not None else nn.Identity()
        self.has_predictor = predictor is not None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, features: bool = False):
        """``features=True`` also returns the backbone features of view 1 (for the online probe)."""
        f1 = self.backbone(x1)
        z1, z2 = self.projector(f1), self.encode(x2)
        if features:
            return self.predictor(z1), self.predictor(z2), z1, z2, f1
        return self.predictor(z1), self.predictor(z2), z1, z2


def build_simsiam(model_cfg) -> SimSiam:
    backbone = build_backbone(model_cfg.arch, model_cfg.stem, model_cfg.zero_init_residual)
    projector = ProjectionHead(backbone.feature_dim, model_cfg.proj_hidden, model_cfg.proj_dim, model_cfg.proj_layers)
    predictor = (
        PredictionHead(model_cfg.proj_dim, model_cfg.pred_hidden, model_cfg.proj_dim) if model_cfg.predictor else None
    )
    return SimSiam(backbone, projector, predictor)
