"""Export a backbone as a Detectron2 checkpoint (``.pkl`` for ``MODEL.WEIGHTS``).

The encoder comes from the export family's one loader (:func:`export.encoder.load_encoder`); the key map,
the stem check and the pickle writer are the core's converter, :mod:`simsiam_kit.detectron2_weights`
(the detectron2 detection engine converts through it too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from simsiam_kit.detectron2_weights import Conversion, check_output, convert_backbone
from simsiam_kit.export.encoder import load_encoder


def export_detectron2(weights: str, output: Path, log: Callable[[str], None] = print) -> Conversion:
    """Convert the backbone of ``weights`` (run dir / checkpoint / backbone.pt / ResNet state dict) to
    ``output`` (.pkl), reporting every key left unconverted."""
    output = check_output(output)
    enc = load_encoder(weights, log=log)
    return convert_backbone(enc.backbone.state_dict(), enc.arch, enc.stem, enc.source, output, log)
