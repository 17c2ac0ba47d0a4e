"""SimSiam loss: symmetrized negative cosine similarity with stop-gradient (paper Eq. 1-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_cosine(p: torch.Tensor, z: torch.Tensor, stop_gradient: bool = True) -> torch.Tensor:
    """D(p, z) = - (p / ||p||) . (z / ||z||), averaged over the batch (paper Eq. 1).

    With ``stop_gradient`` the target ``z`` is detached (paper Eq. 3: D(p1, stopgrad(z2))).
    """
    if stop_gradient:
        z = z.detach()
    return -F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


def simsiam_loss(p1, p2, z1, z2, stop_gradient: bool = True, symmetric: bool = True) -> torch.Tensor:
    """L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2 (paper Eq. 4); ``symmetric=False`` gives D(p1, sg(z2))."""
    if not symmetric:
        return negative_cosine(p1, z2, stop_gradient)
    return 0.5 * negative_cosine(p1, z2, stop_gradient) + 0.5 * negative_cosine(p2, z1, stop_gradient)


@torch.no_grad()
def output_std(z: torch.Tensor) -> torch.Tensor:
    """Per-channel std of the l2-normalised output, averaged over channels (paper Fig. 2, middle).

    About 1/sqrt(d) for a healthy representation, 0 for a collapsed one.
    """
    z = F.normalize(z.float(), dim=1)
    return z.std(dim=0).mean()
