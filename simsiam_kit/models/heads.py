"""SimSiam projection and prediction MLPs, as specified in the paper (Sec. 4 and appendix D)."""

from __future__ import annotations

import torch.nn as nn


class ProjectionHead(nn.Module):
    """Projection MLP ``h`` of the encoder ``f``.

    Paper, Sec. 4 ("Baseline settings"): "The projection MLP (in f) has BN applied to each
    fully-connected (fc) layer, including its output fc. Its output fc has no ReLU. The hidden fc is
    2048-d. This MLP has 3 layers." Appendix D (CIFAR): "the projection MLP has 2 layers".

    Linear layers carry no bias (each is followed by BN, which makes a bias redundant); the output BN
    has no learnable affine parameters, as in the official code (``BatchNorm1d(dim, affine=False)``).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048, num_layers: int = 3):
        super().__init__()
        if num_layers not in (2, 3):
            raise ValueError("num_layers must be 2 or 3")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers += [nn.Linear(dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False)]
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x):
        return self.net(x)


class PredictionHead(nn.Module):
    """Prediction MLP ``h``.

    Paper, Sec. 4: "The prediction MLP (h) has BN applied to its hidden fc layers. Its output fc does
    not have BN or ReLU. This MLP has 2 layers. The dimension of h's input and output (z and p) is
    d = 2048, and h's hidden layer's dimension is 512, making h a bottleneck structure."
    The output fc keeps its bias (official code: ``nn.Linear(pred_dim, dim)``).
    """

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 512, out_dim: int = 2048):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x):
        return self.net(x)
