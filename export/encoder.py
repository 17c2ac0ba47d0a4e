"""The encoder every export format starts from: a backbone (+ the projector for ``head="projector"``),
loaded once from a weights spec, in eval mode, with its preprocessing facts.

:func:`load_encoder` is the one loader of the export family (detectron2 ``export/``: one model, several
formats): ``export onnx`` traces :attr:`Encoder.module`, ``export detectron2`` converts
:attr:`Encoder.backbone`'s state dict. Weights are read by the core's one resolver
(:func:`simsiam_kit.weights.load_backbone`), image settings by the core's one resolver of those
(:func:`simsiam_kit.image_settings.resolve_image_settings`); widths come from the backbone's entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from simsiam_kit.errors import UserError

HEADS = ("backbone", "projector")


class EncoderNet(nn.Module):
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

    def half_precision(self) -> "EncoderNet":
        """A float16 copy (weights and arithmetic), I/O still float32; this module is left as it is."""
        import copy

        return copy.deepcopy(EncoderNet(self.backbone, self.projector, fp16=True)).half().eval()


@dataclass
class Encoder:
    module: EncoderNet
    arch: str
    stem: str
    head: str
    embedding_dim: int
    image_size: int
    mean: tuple
    std: tuple
    source: str
    record: dict = field(default_factory=dict)  # what the weights loader recorded (file, sha256, epoch, run)

    @property
    def backbone(self) -> nn.Module:
        return self.module.backbone


def projector_from_checkpoint(weights: str, feature_dim: int) -> tuple[nn.Module, str]:
    """The projector of a full simsiam-kit checkpoint (a run dir's checkpoints/last.pt), and the file read."""
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
    log: Optional[Callable[[str], None]] = None,
) -> Encoder:
    """Backbone (and projector for ``head="projector"``) in eval mode, with its preprocessing facts:
    option > weights metadata > run config > the stem's default size (ImageNet mean/std). ``log``: where
    the loader's notice goes (what another project's file held; a run still training)."""
    from simsiam_kit.image_settings import resolve_image_settings
    from simsiam_kit.models.backbones import get_backbone_entry
    from simsiam_kit.weights import is_random, load_backbone

    if head not in HEADS:
        raise UserError(f"unknown head '{head}' (available: {', '.join(HEADS)})")
    if head == "projector" and is_random(weights):
        raise UserError("--head projector needs trained weights (a run directory or checkpoint), not 'random'")
    lb = load_backbone(str(weights), arch=arch, stem=stem)
    if log is not None and lb.notice():  # what another project's file held and what was read
        log(lb.notice())
    backbone = lb.model.eval()
    dim, projector, source = get_backbone_entry(lb.arch).feature_dim, None, lb.source
    if head == "projector":
        projector, source = projector_from_checkpoint(str(weights), dim)
        projector.eval()
        dim = int(projector.out_dim)
    img = resolve_image_settings(
        option={"image_size": image_size}, weights=lb.weights_settings, config=lb.config_settings, stem=lb.stem
    )
    return Encoder(
        EncoderNet(backbone, projector).eval(),
        lb.arch,
        lb.stem,
        head,
        dim,
        img.image_size,
        img.mean,
        img.std,
        source,
        record=dict(lb.record),
    )
