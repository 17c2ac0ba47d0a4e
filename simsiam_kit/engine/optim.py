"""Optimizers by name: one table (``OPTIMIZERS``) that builds an optimizer from parameters and the
usual settings, and :class:`LARS`, the layer-wise adaptive rate wrapper the official linear probe
selects with ``--lars``. Unknown names fail loudly with the available ones."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from simsiam_kit.errors import UserError


class LARS:
    """Layer-wise adaptive rate scaling around an SGD optimizer, as apex ``LARC(clip=False)`` used by
    the official ``main_lincls.py --lars``: each tensor's gradient (plus weight decay) is scaled by
    ``trust * ||w|| / (||g|| + wd ||w|| + eps)`` before the wrapped step; tensors with a zero norm
    (the zero-initialised bias at the first step) are left unscaled."""

    def __init__(self, optimizer: torch.optim.Optimizer, trust_coefficient: float = 0.001, eps: float = 1e-8):
        self.optim, self.trust, self.eps = optimizer, trust_coefficient, eps

    @property
    def param_groups(self):
        return self.optim.param_groups

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, sd):
        self.optim.load_state_dict(sd)

    def zero_grad(self, set_to_none: bool = True):
        self.optim.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self):
        saved_wd = []
        for group in self.optim.param_groups:
            wd = group.get("weight_decay", 0.0)
            saved_wd.append(wd)
            group["weight_decay"] = 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                p_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                if p_norm != 0 and g_norm != 0:
                    rate = self.trust * p_norm / (g_norm + p_norm * wd + self.eps)
                    p.grad.add_(p, alpha=wd).mul_(rate)
        self.optim.step()
        for group, wd in zip(self.optim.param_groups, saved_wd):
            group["weight_decay"] = wd


def _sgd(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    return torch.optim.SGD(params, lr, momentum=momentum, weight_decay=weight_decay)


def _lars(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    return LARS(_sgd(params, lr, momentum, weight_decay))


OPTIMIZERS: dict[str, Callable] = {"sgd": _sgd, "lars": _lars}


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.9, weight_decay: float = 0.0
):
    """The optimizer ``name`` (a key of ``OPTIMIZERS``) over ``params``."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{name}' (available: {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name](params, lr, momentum=momentum, weight_decay=weight_decay)
