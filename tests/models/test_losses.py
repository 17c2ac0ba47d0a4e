import math

import torch

from simsiam_kit.losses import negative_cosine, output_std, simsiam_loss


def test_negative_cosine_hand_computed():
    p = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    z = torch.tensor([[0.0, 2.0], [3.0, 4.0]])
    # row 1: orthogonal -> cos 0; row 2: identical direction -> cos 1; mean = 0.5, D = -0.5
    assert torch.isclose(negative_cosine(p, z), torch.tensor(-0.5))


def test_symmetric_loss_value():
    p1 = torch.tensor([[1.0, 0.0]])
    z2 = torch.tensor([[1.0, 1.0]])  # cos = 1/sqrt(2)
    p2 = torch.tensor([[0.0, 1.0]])
    z1 = torch.tensor([[0.0, -5.0]])  # cos = -1
    expected = 0.5 * (-1 / math.sqrt(2)) + 0.5 * 1.0
    assert abs(simsiam_loss(p1, p2, z1, z2).item() - expected) < 1e-6
    assert abs(simsiam_loss(p1, p2, z1, z2, symmetric=False).item() - (-1 / math.sqrt(2))) < 1e-6


def test_stop_gradient_blocks_target_branch():
    p1 = torch.randn(4, 8, requires_grad=True)
    p2 = torch.randn(4, 8, requires_grad=True)
    z1 = torch.randn(4, 8, requires_grad=True)
    z2 = torch.randn(4, 8, requires_grad=True)
    simsiam_loss(p1, p2, z1, z2, stop_gradient=True).backward()
    assert z1.grad is None and z2.grad is None  # nothing flows into the targets
    assert p1.grad is not None and p1.grad.abs().sum() > 0

    for t in (p1, p2, z1, z2):
        t.grad = None
    simsiam_loss(p1, p2, z1, z2, stop_gradient=False).backward()
    assert z1.grad is not None and z1.grad.abs().sum() > 0  # the ablation lets gradients through


def test_stop_gradient_through_model_graph():
    """With p = h(z) and z = f(x), gradients reach f only through p (not through the target z)."""
    f = torch.nn.Linear(3, 3, bias=False)
    h = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        h.weight.zero_()  # p = 0 * z + ... -> the p-branch carries no gradient to f
        h.weight[0, 0] = 0.0
    x1, x2 = torch.randn(5, 3), torch.randn(5, 3)
    z1, z2 = f(x1), f(x2)
    p1, p2 = h(z1) + 1.0, h(z2) + 1.0  # constant predictions: d p / d f = 0
    simsiam_loss(p1, p2, z1, z2, stop_gradient=True).backward()
    assert f.weight.grad.abs().sum() == 0  # stop-gradient: no path from loss to f
    f.weight.grad = None
    z1, z2 = f(x1), f(x2)
    p1, p2 = h(z1) + 1.0, h(z2) + 1.0
    simsiam_loss(p1, p2, z1, z2, stop_gradient=False).backward()
    assert f.weight.grad.abs().sum() > 0


def test_output_std_healthy_and_collapsed():
    torch.manual_seed(0)
    z = torch.randn(4096, 256)
    assert abs(output_std(z).item() * math.sqrt(256) - 1.0) < 0.05  # ~1/sqrt(d) for Gaussian output
    collapsed = torch.ones(64, 256) + 1e-4 * torch.randn(64, 256)
    assert output_std(collapsed).item() < 1e-3
