"""An online linear probe during pretraining (as solo-learn and lightly train one): a linear classifier on
the *detached* backbone features of the first view, with its own SGD, updated at every step next to
SimSiam. It never touches the backbone's gradients (the features are detached, the probe has its own
optimizer); its top-1 on the val set goes into ``metrics.jsonl`` (``online_probe_top1``) each epoch.

``train.online_probe``: null/auto = on when the training images have labels, a labelled val set is given
and the data are in memory (CIFAR-sized runs); off for file datasets (ImageNet-sized runs), where the
extra val pass each epoch is not free. The step's own cost is a (B x feature_dim) x (feature_dim x C)
product: ``benchmarks/online_probe.py`` measures it against a step without the probe.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from simsiam_kit.engine.trainer import Hook
from simsiam_kit.utils import dist

PROBE_BASE_LR = 0.1  # x batch / 256, the official linear probe's rate; momentum 0.9, no weight decay


class OnlineProbe:
    def __init__(self, feature_dim: int, num_classes: int, device: torch.device, batch_size: int):
        self.head = torch.nn.Linear(feature_dim, num_classes).to(device)
        torch.nn.init.normal_(self.head.weight, std=0.01)  # as the offline probe (main_lincls.py)
        torch.nn.init.zeros_(self.head.bias)
        self.net: torch.nn.Module = self.head
        if dist.is_dist():  # one head for all processes: its gradients are averaged like the model's
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.head, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.opt = torch.optim.SGD(self.head.parameters(), lr=PROBE_BASE_LR * batch_size / 256, momentum=0.9)
        self.num_classes = num_classes

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> dict:
        """One update on detached features; returns the batch's loss and accuracy (device tensors)."""
        x = features.detach().float()
        y = labels.to(x.device, non_blocking=True)
        with torch.autocast(x.device.type, enabled=False):
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        acc = (logits.detach().argmax(1) == y).float().mean() * 100
        return {"probe_loss": loss.detach(), "probe_acc": acc}

    @torch.no_grad()
    def top1(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        logits = self.head(features.float().to(self.head.weight.device))
        return 100.0 * (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()

    def state_dict(self) -> dict:
        return {
            "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "optimizer": self.opt.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["optimizer"])


class OnlineProbeMonitor(Hook):
    """Val top-1 of the online probe after every epoch (rank 0), after the epoch's checkpoint."""

    def __init__(self, evaluate: Callable[[], float]):
        self.evaluate = evaluate

    def after_epoch(self, trainer) -> None:
        acc = dist.on_main(self.evaluate)  # collective: an error on rank 0 stops every rank, none waits for it
        if dist.is_main():
            trainer.epoch_metrics["online_probe_top1"] = acc
