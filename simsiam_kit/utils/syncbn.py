"""Synchronised BatchNorm for every device.

``torch.nn.SyncBatchNorm`` only runs on GPU. For CPU (gloo) runs this module provides the same
computation with differentiable collectives: per-channel sum, sum of squares and count are
all-reduced (``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces the gradient),
so the forward normalises with global batch statistics and the backward is exact.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from simsiam_kit.utils import dist


class GlooSyncBatchNorm(_BatchNorm):
    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_dist()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.tensor([xf.numel() / c], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = all_reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        rm, rv, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        if self.track_running_stats and rm is not None and rv is not None and tracked is not None:
            with torch.no_grad():
                tracked += 1  # in place: the buffer itself
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                rm.mul_(1 - m).add_(mean.detach(), alpha=m)
                rv.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype) if not torch.is_autocast_enabled() else y


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """torch's SyncBatchNorm on CUDA; :class:`GlooSyncBatchNorm` elsewhere."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, _BatchNorm):
        out = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device_type))
    return out
