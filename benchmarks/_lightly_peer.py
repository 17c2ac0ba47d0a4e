"""The peer: lightly 1.6.0's SimSiam example (``pip install -e ".[bench]"``), set up in one place for every
benchmark that compares against it.

As in lightly's example: ``SimSiamTransform(input_size=32)`` (its defaults, blur included) applied per image
with PIL in a DataLoader, ``SimSiamProjectionHead(512, 2048, 2048)``, ``SimSiamPredictionHead(2048, 512, 2048)``,
``NegativeCosineSimilarity``, ``SGD(lr=0.06)`` and a plain fp32 loop. The backbone is the caller's.

On a GPU (``device="cuda"``) the loop is the example's: views copied to the device per step (pinned
memory), the loss kept on the device (no ``.item()`` per step). ``amp=True`` is the strongest setting a
lightly user has on top of the example: bf16 autocast and channels_last.
"""

from __future__ import annotations

import numpy as np
import torch


def lightly_example(
    images: np.ndarray, backbone: torch.nn.Module, batch: int, workers: int, device="cpu", amp: bool = False
):
    """Return ``(model, loader, step)``; ``step((x0, x1))`` runs one training step and returns (images, loss),
    the loss a 0-d tensor on the device."""
    import contextlib

    import torch.nn as nn
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
    from lightly.transforms import SimSiamTransform
    from PIL import Image

    class SimSiam(nn.Module):  # lightly's example module
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = SimSiamProjectionHead(512, 2048, 2048)
            self.prediction_head = SimSiamPredictionHead(2048, 512, 2048)

        def forward(self, x):
            f = self.backbone(x).flatten(start_dim=1)
            z = self.projection_head(f)
            p = self.prediction_head(z)
            return z.detach(), p

    transform = SimSiamTransform(input_size=32)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return transform(Image.fromarray(images[i])), 0

    device = torch.device(device)
    model = SimSiam(backbone).to(device, memory_format=torch.channels_last if amp else torch.contiguous_format)
    crit = NegativeCosineSimilarity()
    opt = torch.optim.SGD(model.parameters(), lr=0.06)  # lightly's example optimizer
    loader = torch.utils.data.DataLoader(
        DS(),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    def step(views):
        x0, x1 = (v.to(device, non_blocking=True) for v in views)
        if amp:
            x0, x1 = (v.contiguous(memory_format=torch.channels_last) for v in (x0, x1))
        model.train()
        with autocast():
            z0, p0 = model(x0)
            z1, p1 = model(x1)
            loss = 0.5 * (crit(z0, p1) + crit(z1, p0))
        loss.backward()
        opt.step()
        opt.zero_grad()
        return x0.shape[0], loss.detach()

    return model, loader, step
