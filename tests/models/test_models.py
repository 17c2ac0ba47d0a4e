import torch
import torch.nn as nn
import torchvision

from simsiam_kit.config import ModelConfig
from simsiam_kit.models import PredictionHead, ProjectionHead, build_backbone, build_simsiam


def _layer_types(m):
    return [type(x).__name__ for x in m.net]


def test_projection_head_3_layers_matches_paper():
    h = ProjectionHead(512, 2048, 2048, num_layers=3)
    assert _layer_types(h) == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
    ]
    linears = [m for m in h.net if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(512, 2048), (2048, 2048), (2048, 2048)]
    assert all(l.bias is None for l in linears)
    out_bn = h.net[-1]
    assert out_bn.affine is False and out_bn.weight is None and out_bn.bias is None
    assert all(bn.affine for bn in h.net[:-1] if isinstance(bn, nn.BatchNorm1d))


def test_projection_head_2_layers_cifar():
    h = ProjectionHead(512, 2048, 2048, num_layers=2)
    assert _layer_types(h) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert h.net[-1].affine is False


def test_prediction_head_bottleneck():
    h = PredictionHead(2048, 512, 2048)
    assert _layer_types(h) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (h.net[0].in_features, h.net[0].out_features) == (2048, 512)
    assert (h.net[3].in_features, h.net[3].out_features) == (512, 2048)
    assert h.net[3].bias is not None  # output fc has bias, no BN, no ReLU


def test_cifar_stem_and_keys_match_torchvision():
    bb = build_backbone("resnet18", "cifar")
    assert bb.conv1.kernel_size == (3, 3) and bb.conv1.stride == (1, 1)
    assert isinstance(bb.maxpool, nn.Identity)
    assert bb(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    tv_keys = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert set(bb.state_dict()) == tv_keys


def test_zero_init_residual():
    bb = build_backbone("resnet50", "imagenet", zero_init_residual=True)
    assert torch.count_nonzero(bb.layer1[0].bn3.weight) == 0
    bb18 = build_backbone("resnet18", "imagenet", zero_init_residual=True)
    assert torch.count_nonzero(bb18.layer1[0].bn2.weight) == 0


def test_simsiam_forward_shapes_and_ablation():
    cfg = ModelConfig(arch="resnet18", stem="cifar", proj_dim=128, proj_hidden=128, pred_hidden=32)
    m = build_simsiam(cfg)
    p1, p2, z1, z2 = m(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    assert p1.shape == z1.shape == (4, 128)
    m2 = build_simsiam(ModelConfig(proj_dim=64, proj_hidden=64, predictor=False))
    p1, _, z1, _ = m2(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    assert torch.equal(p1, z1)  # no predictor: p is z
