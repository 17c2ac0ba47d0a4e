"""One optimisation step (zero_grad, backward, optional clipping, step), shared by pretraining, the linear
probe and the torchvision detection engine. Mixed precision is a value: the GradScaler exists only for
fp16 on CUDA, and the caller's forward runs under ``precision.autocast()``."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from simsiam_kit.utils.device import Precision


class OptimStep:
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        precision: Optional[Precision] = None,
        grad_clip: float = 0.0,
        params: Optional[Iterable[torch.nn.Parameter]] = None,
    ):
        self.opt = optimizer
        self.scaler = torch.amp.GradScaler("cuda") if precision is not None and precision.needs_scaler else None
        self.grad_clip = float(grad_clip)
        self.params = list(params) if params is not None else [p for g in optimizer.param_groups for p in g["params"]]

    def __call__(self, loss: torch.Tensor) -> None:
        """Backward ``loss`` and update the parameters."""
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip > 0:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.opt.step()
