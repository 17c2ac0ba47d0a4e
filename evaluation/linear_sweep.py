"""A linear probe that finds its own learning rate: many heads trained at once on cached features.

``simsiam-kit eval linear --cached-features --lr-sweep`` trains one linear head per (learning rate,
weight decay) pair in one pass over the same cached features (as DINO's ``eval_linear.py`` trains one
head per learning rate): base learning rates ``SWEEP_LRS`` from 1e-3 to 30 (the official code's 0.1 and
the plain-SGD habit of 30 both inside; the rate used is base x batch / 256, cosine-decayed once per epoch
like the single head), each with weight decay 0 and ``SWEEP_WD``. The head is chosen on a held-out slice
of the *training* set (``val_fraction``, seeded), never on the test set; the test set then scores the
chosen head only. All heads see the same batches; a head's update is exactly ``torch.optim.SGD`` with
its own lr and weight decay (:class:`SweepSGD`, tested against it), so the sweep costs one pass of a
batched matmul instead of one training run per setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from simsiam_kit.engine import Trainer
from simsiam_kit.engine.hooks import EpochAverages, Hook, LRSchedule, MetricsWriter, ProgressBar, Throughput
from simsiam_kit.utils.io import atomic_savefig

SWEEP_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
SWEEP_WD = 1e-4


class HeadBank(torch.nn.Module):
    """``H`` linear heads ``D -> C`` over the same features: logits (H, B, C) = x @ W[h] + b[h]. Each head is
    initialised as :func:`evaluation.linear.make_head` (weight ~ N(0, 0.01), bias 0)."""

    def __init__(self, heads: int, in_features: int, classes: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(heads, classes, in_features) * 0.01)
        self.bias = torch.nn.Parameter(torch.zeros(heads, classes))

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, c, d = self.weight.shape
        # one GEMM for all heads: (B, D) x (D, H*C)
        logits = torch.addmm(self.bias.reshape(1, h * c), x, self.weight.reshape(h * c, d).t())
        return logits.view(-1, h, c).transpose(0, 1)

    def head(self, h: int) -> torch.nn.Linear:
        """Head ``h`` as a plain ``nn.Linear`` (what ``head.pt`` stores)."""
        lin = torch.nn.Linear(self.weight.shape[2], self.weight.shape[1])
        with torch.no_grad():
            lin.weight.copy_(self.weight[h])
            lin.bias.copy_(self.bias[h])
        return lin


class SweepSGD:
    """SGD with momentum and one (lr, weight decay) per head: for every head the same update as
    ``torch.optim.SGD([W_h, b_h], lr_h, momentum, weight_decay=wd_h)`` (dampening 0, no Nesterov).

    ``param_groups[0]["lr"]`` is the schedule's value for a base rate of ``ref_lr``; each head's rate is
    scaled by the same factor, so the shared :class:`LRSchedule` hook drives all heads."""

    def __init__(self, bank: HeadBank, lrs: torch.Tensor, wds: torch.Tensor, momentum: float, ref_lr: float = 1.0):
        self.bank, self.momentum, self.ref_lr = bank, momentum, ref_lr
        self.lrs, self.wds = lrs.to(bank.weight), wds.to(bank.weight)
        self.param_groups = [{"lr": ref_lr, "params": list(bank.parameters())}]
        self.buf: dict = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.bank.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        factor = self.param_groups[0]["lr"] / self.ref_lr
        for name, p in (("weight", self.bank.weight), ("bias", self.bank.bias)):
            shape = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad + self.wds.view(shape) * p
            if name in self.buf:
                g = self.buf[name].mul_(self.momentum).add_(g)
            else:
                g = g.clone()
            self.buf[name] = g
            p.sub_(self.lrs.view(shape) * factor * g)


class SweepStep:
    """One step for all heads: the sum over heads of each head's mean cross-entropy (heads are independent,
    so each head's gradient is that of its own loss)."""

    def __init__(self, bank: HeadBank, opt: SweepSGD, device: torch.device):
        self.bank, self.opt, self.device = bank, opt, device

    def __call__(self, batch, trainer):
        x = batch["features"].to(self.device, non_blocking=True)
        y = batch["labels"].to(self.device, non_blocking=True)
        logits = self.bank(x)  # (H, B, C)
        h, b, c = logits.shape
        # cross-entropy of every head at once: logsumexp over classes minus the true class's logit
        per_head = (torch.logsumexp(logits, 2) - logits.gather(2, y.view(1, b, 1).expand(h, b, 1)).squeeze(2)).mean(1)
        loss = per_head.sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": per_head.detach().min(), "images": int(b)}


@torch.no_grad()
def bank_accuracy(bank: HeadBank, features: torch.Tensor, labels: torch.Tensor, batch: int = 4096) -> tuple:
    """top-1 and top-5 (percent) of every head: two (H,) tensors."""
    dev = bank.weight.device
    k5 = min(5, bank.out_features)
    c1 = torch.zeros(bank.weight.shape[0], dtype=torch.float64)
    c5 = torch.zeros_like(c1)
    for s in range(0, len(labels), batch):
        logits = bank(features[s : s + batch].to(dev))
        y = labels[s : s + batch].to(dev)
        top = logits.topk(k5, dim=2).indices  # (H, B, k)
        c1 += (top[:, :, 0] == y).sum(1).double().cpu()
        c5 += (top == y.view(1, -1, 1)).any(2).sum(1).double().cpu()
    n = max(1, len(labels))
    return 100.0 * c1 / n, 100.0 * c5 / n


def split_holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held-out) of a seeded random split; at least one image on each side."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 17))
    k = min(n - 1, max(1, int(round(n * fraction))))
    return order[k:], order[:k]


@dataclass
class SweepResult:
    bank: HeadBank
    grid: list  # [{"lr", "weight_decay", "holdout_top1"}], in head order
    selected: int
    history: list


def run_sweep(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int,
    batch_size: int,
    device: torch.device,
    lrs: Sequence[float] = SWEEP_LRS,
    weight_decay: float = SWEEP_WD,
    momentum: float = 0.9,
    val_fraction: float = 0.1,
    seed: int = 0,
    metrics_path=None,
    progress: bool = False,
    log_every: int = 10,
    sinks=(),
) -> SweepResult:
    """Train one head per (lr, wd) on all but a held-out slice of ``features``; pick the best on the slice."""
    from simsiam_kit.evaluation.linear import TensorLoader

    fit, hold = split_holdout(len(labels), val_fraction, seed)
    grid = [(float(lr), wd) for wd in (0.0, float(weight_decay)) for lr in lrs]
    scale = batch_size / 256  # the rate used is base x batch / 256, as for the single head
    torch.manual_seed(seed)
    bank = HeadBank(len(grid), features.shape[1], num_classes).to(device)
    opt = SweepSGD(bank, torch.tensor([lr * scale for lr, _ in grid]), torch.tensor([wd for _, wd in grid]), momentum)
    loader = TensorLoader(features[fit], labels[fit], min(batch_size, len(fit)), shuffle=True, seed=seed)
    history: list[dict] = []

    class _Record(Hook):
        def after_epoch(self, trainer) -> None:
            history.append({"epoch": trainer.epoch, "lr_factor": trainer.state.get("lr"), **trainer.epoch_metrics})

    # hooks run in the order registered: schedule, timing, averages, metrics.jsonl, progress, record
    hooks: list[Hook] = [LRSchedule(opt, 1.0, epochs), Throughput(), EpochAverages()]
    if metrics_path is not None:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
        hooks.append(MetricsWriter(metrics_path, log_every, sinks))
    hooks += [ProgressBar(progress, desc="linear sweep"), _Record()]
    Trainer(SweepStep(bank, opt, device), loader, epochs, hooks).train()
    top1, _ = bank_accuracy(bank, features[hold], labels[hold])
    top1 = torch.nan_to_num(top1, nan=-1.0)
    selected = int(torch.argmax(top1))  # ties: the first in grid order (smaller weight decay, then smaller lr)
    rows = [{"lr": lr, "weight_decay": wd, "holdout_top1": round(float(a), 3)} for (lr, wd), a in zip(grid, top1)]
    return SweepResult(bank, rows, selected, history)


def plot_sweep(grid: list, selected: int, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for wd in sorted({r["weight_decay"] for r in grid}):
        rs = [r for r in grid if r["weight_decay"] == wd]
        ax.plot([r["lr"] for r in rs], [r["holdout_top1"] for r in rs], marker="o", ms=3, label=f"weight decay {wd:g}")
    sel = grid[selected]
    ax.scatter([sel["lr"]], [sel["holdout_top1"]], s=80, facecolors="none", edgecolors="k", label="selected")
    ax.set_xscale("log")
    ax.set(xlabel="base learning rate (x batch / 256)", ylabel="held-out train top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def sweep_table(grid: list, selected: int) -> str:
    from simsiam_kit.evaluation.common import format_table

    rows = [
        [f"{r['lr']:g}", f"{r['weight_decay']:g}", r["holdout_top1"], "<-" if i == selected else ""]
        for i, r in enumerate(grid)
    ]
    return format_table(["base lr", "weight decay", "held-out top-1 %", "selected"], rows)
