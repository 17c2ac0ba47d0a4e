"""Batched, vectorised augmentation on uint8 image batches (CPU or GPU).

The SimSiam augmentation (paper Sec. 4 / official ``main_simsiam.py``, MoCo v2's recipe)::

    RandomResizedCrop(size, scale=(0.2, 1.0))
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    RandomGrayscale(p=0.2)
    RandomApply([GaussianBlur(sigma in [0.1, 2.0])], p=0.5)    # ImageNet only
    RandomHorizontalFlip()
    Normalize(mean, std)

Each op here samples its parameters per image with the same distributions as torchvision's
(crop: torchvision's 10-attempt RandomResizedCrop sampler; jitter: factors in [1-s, 1+s], hue in
[-h, h], a random op order per image), but applies them to the whole batch at once with tensor ops,
so two CPU cores are not starved by per-image PIL work. Differences from the PIL pipeline, stated:
the crop is resampled bilinearly with ``grid_sample`` (no antialias; crops of a 32 px image are only
ever upsampled), and the blur is a separable Gaussian with a 6-sigma support instead of PIL's box
approximation.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def _rand(gen, n, lo, hi, device="cpu"):
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def sample_resized_crops(
    n: int, height: int, width: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), gen: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Per-image crop boxes (top, left, h, w) with torchvision ``RandomResizedCrop.get_params``'s law."""
    area = height * width
    attempts = 10
    target_area = area * _rand(gen, (n, attempts), scale[0], scale[1])
    log_r = _rand(gen, (n, attempts), math.log(ratio[0]), math.log(ratio[1]))
    ar = torch.exp(log_r)
    w = torch.round(torch.sqrt(target_area * ar))
    h = torch.round(torch.sqrt(target_area / ar))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, dtype=torch.long))
    # fallback: central crop with the ratio clamped into range (torchvision's behaviour)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    rows = torch.arange(n)
    sel = first.clamp(min=0)
    hh = torch.where(first >= 0, h[rows, sel], torch.full((n,), float(fh)))
    ww = torch.where(first >= 0, w[rows, sel], torch.full((n,), float(fw)))
    u = torch.rand((n, 2), generator=gen)
    top = torch.where(first >= 0, torch.floor(u[:, 0] * (height - hh + 1)), torch.full((n,), float((height - fh) // 2)))
    left = torch.where(first >= 0, torch.floor(u[:, 1] * (width - ww + 1)), torch.full((n,), float((width - fw) // 2)))
    return torch.stack([top, left, hh, ww], 1)


def resized_crop_flip(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Crop ``boxes`` (top, left, h, w; pixels) from float images x (B,C,H,W), resize to size x size
    bilinearly, mirroring where ``flip`` is True. One ``grid_sample`` call for the whole batch."""
    b, _, hgt, wid = x.shape
    boxes = boxes.to(x.device, torch.float32)
    top, left, h, w = boxes.unbind(1)
    # affine theta maps output coords in [-1, 1] to input coords (align_corners=False convention)
    sx = w / wid
    sy = h / hgt
    cx = (left + w / 2) / wid * 2 - 1
    cy = (top + h / 2) / hgt * 2 - 1
    sign = torch.where(flip.to(x.device), -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = sx * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, (b, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(a, b, f):
    return (f * a + (1 - f) * b).clamp_(0, 1)


def adjust_brightness(x, f):
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x, f):
    m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, m, f.view(-1, 1, 1, 1))


def adjust_saturation(x, f):
    return _blend(x, _gray(x), f.view(-1, 1, 1, 1))


def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    mask = i.unsqueeze(1) == torch.arange(6, device=i.device).view(-1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), 1)
    a2 = torch.stack((t, v, v, q, p, p), 1)
    a3 = torch.stack((p, p, t, v, v, q), 1)
    a4 = torch.stack((a1, a2, a3), 1)  # B,3,6,H,W
    return (a4 * mask.unsqueeze(1)).sum(2)


def adjust_hue(x, f):
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, v)


def gaussian_blur(x, sigma: torch.Tensor, max_sigma: float):
    """Separable Gaussian blur with a per-image sigma (support 2*ceil(3*max_sigma)+1, reflect padding)."""
    b, c, hgt, wid = x.shape
    radius = int(math.ceil(3 * max_sigma))
    radius = min(radius, (min(hgt, wid) - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.to(x).view(-1, 1) ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, K)
    kk = k.repeat_interleave(c, 0)  # (B*C, K)
    y = x.reshape(1, b * c, hgt, wid)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, kk.view(b * c, 1, 1, -1), groups=b * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, kk.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, hgt, wid)


class BatchAugment:
    """SimSiam view augmentation for a uint8 batch (B,3,H,W) -> normalised float batch (B,3,S,S).

    ``crop=False`` when crops were already taken per image (file datasets, see loaders): then only the
    photometric ops, flip excluded, run here.
    """

    def __init__(self, data_cfg, crop: bool = True, crop_scale=None, color: bool = True):
        self.size = data_cfg.image_size
        self.scale = (crop_scale if crop_scale is not None else (data_cfg.crop_min_scale, 1.0))
        self.crop = crop
        self.color = color
        self.jitter_p = data_cfg.color_jitter_prob
        self.jitter = tuple(data_cfg.color_jitter)
        self.gray_p = data_cfg.grayscale_prob
        self.blur_p = data_cfg.blur_prob
        self.blur_sigma = tuple(data_cfg.blur_sigma)
        self.flip_p = data_cfg.flip_prob
        self.mean = torch.tensor(data_cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(data_cfg.std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, gen: Optional[torch.Generator] = None) -> torch.Tensor:
        x = images.float().div_(255)
        n = x.shape[0]
        if self.crop:
            boxes = sample_resized_crops(n, x.shape[2], x.shape[3], self.scale, gen=gen)
            flip = torch.rand(n, generator=gen) < self.flip_p
            x = resized_crop_flip(x, boxes, self.size, flip)
        if self.color:
            x = self.photometric(x, gen)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def photometric(self, x: torch.Tensor, gen) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        bri, con, sat, hue = self.jitter
        apply = torch.rand(n, generator=gen) < self.jitter_p
        factors = [
            _rand(gen, n, max(0.0, 1 - bri), 1 + bri),
            _rand(gen, n, max(0.0, 1 - con), 1 + con),
            _rand(gen, n, max(0.0, 1 - sat), 1 + sat),
            _rand(gen, n, -hue, hue),
        ]
        order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)  # a random op order per image
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for step in range(4):
            for op_id, op in enumerate(ops):
                if (op_id == 3 and hue == 0) or (op_id < 3 and self.jitter[op_id] == 0):
                    continue
                idx = torch.nonzero(apply & (order[:, step] == op_id)).flatten()
                if idx.numel():
                    idx_d = idx.to(dev)
                    x[idx_d] = op(x[idx_d], factors[op_id][idx].to(dev))
        gray = torch.rand(n, generator=gen) < self.gray_p
        if gray.any():
            g = gray.to(dev)
            x[g] = _gray(x[g]).expand(-1, 3, -1, -1)
        if self.blur_p > 0:
            blur = torch.rand(n, generator=gen) < self.blur_p
            sigma = _rand(gen, n, *self.blur_sigma)
            idx = torch.nonzero(blur).flatten()
            if idx.numel():
                idx_d = idx.to(dev)
                x[idx_d] = gaussian_blur(x[idx_d], sigma[idx], self.blur_sigma[1])
        return x


class EvalTransform:
    """uint8 batch -> normalised float batch for evaluation (crops were done by the loader if needed)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, gen=None) -> torch.Tensor:
        x = images.float().div_(255)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)
