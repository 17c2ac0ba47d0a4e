"""The export family's one loader: the encoder it builds computes the saved backbone (+ projector), its width
is the backbone entry's, and the detectron2 export through it writes what the core's converter writes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from simsiam_kit.config import ModelConfig
from simsiam_kit.detectron2_weights import convert_weights
from simsiam_kit.engine.checkpoint import save_backbone, save_checkpoint
from simsiam_kit.errors import UserError
from simsiam_kit.export.detectron2 import export_detectron2
from simsiam_kit.export.encoder import load_encoder
from simsiam_kit.models import BACKBONES, build_backbone, build_simsiam


def _trained_like(module: torch.nn.Module, side: int) -> torch.nn.Module:
    with torch.no_grad():  # BN running statistics away from (0, 1), so a wrong load would show
        module.train()
        module(torch.randn(4, 3, side, side))
    return module.eval()


def test_backbone_encoder_computes_the_saved_backbone(tmp_path):
    torch.manual_seed(0)
    bb = _trained_like(build_backbone("resnet34", "cifar", zero_init_residual=False), 16)
    save_backbone(tmp_path / "bb.pt", bb, "resnet34", "cifar", {"image_size": 16})
    enc = load_encoder(str(tmp_path / "bb.pt"))
    assert (enc.arch, enc.stem, enc.head, enc.image_size) == ("resnet34", "cifar", "backbone", 16)
    assert enc.embedding_dim == BACKBONES["resnet34"].feature_dim == 512
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(enc.module(x), bb(x)) and not enc.module.training
        half = enc.module.half_precision()(x)
    assert half.dtype == torch.float32 and torch.nn.functional.cosine_similarity(half, bb(x)).min() > 0.999
    assert next(enc.module.parameters()).dtype == torch.float32  # the fp16 copy left the encoder alone


def test_projector_encoder_and_its_width(tmp_path):
    cfg = ModelConfig(
        arch="resnet18", stem="cifar", zero_init_residual=False, proj_dim=24, proj_hidden=20, proj_layers=2
    )
    torch.manual_seed(1)
    model = build_simsiam(cfg)
    with torch.no_grad():
        model.train()
        model.encode(torch.randn(4, 3, 16, 16))
    model.eval()
    run = tmp_path / "run"
    save_checkpoint(
        run / "checkpoints" / "last.pt",
        model=model.state_dict(),
        config={"model": {"arch": "resnet18", "stem": "cifar"}},
    )
    enc = load_encoder(str(run), head="projector", image_size=16)
    assert enc.embedding_dim == 24 and enc.source.endswith("last.pt")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(enc.module(x), model.encode(x))
    with pytest.raises(UserError, match="unknown head 'predictor'"):
        load_encoder(str(run), head="predictor")


def test_detectron2_export_writes_what_the_converter_writes(tmp_path):
    torch.manual_seed(2)
    bb = build_backbone("resnet18", "imagenet")
    save_backbone(tmp_path / "bb.pt", bb, "resnet18", "imagenet")
    lines = []
    conv = export_detectron2(str(tmp_path / "bb.pt"), tmp_path / "a.pkl", log=lines.append)
    convert_weights(str(tmp_path / "bb.pt"), tmp_path / "b.pkl", log=lambda s: None)
    a, b = (pickle.loads((tmp_path / n).read_bytes()) for n in ("a.pkl", "b.pkl"))
    assert a.keys() == b.keys() and a["model"].keys() == b["model"].keys() == set(conv.model)
    assert all(np.array_equal(a["model"][k], b["model"][k]) for k in a["model"])
    np.testing.assert_array_equal(a["model"]["stem.conv1.weight"], bb.conv1.weight.detach().numpy())
    assert "resnet18 backbone, 100 tensors converted" in lines[0]
    with pytest.raises(UserError, match=r"\.pkl file"):
        export_detectron2(str(tmp_path / "bb.pt"), tmp_path / "c.pt")
