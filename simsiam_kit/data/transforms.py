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

Random parameters are drawn first, all from one generator (on the generator's device: a CUDA
generator keeps the whole pipeline on the GPU), then applied. Two ways to apply them compute the same
function: on the CPU each op runs on the images that drew it (index subsets: least arithmetic); on a
GPU every op runs on the whole batch and ``torch.where`` keeps the images that drew it, so nothing
waits for the host (no ``nonzero``, no ``.any()``, no host RNG) and the launches do not depend on the
data. ``tests/test_data.py`` checks that both give the same images.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def _rand(gen, n, lo, hi, device=None):
    return torch.rand(n, generator=gen, device=_rng_device(gen, device)) * (hi - lo) + lo


def _rng_device(gen: Optional[torch.Generator], device=None) -> torch.device:
    """Random numbers are drawn where the generator lives (a generator only draws on its own device)."""
    if gen is not None:
        return gen.device
    return torch.device(device) if device is not None else torch.device("cpu")


def sample_resized_crops(
    n: int,
    height: int,
    width: int,
    scale=(0.2, 1.0),
    ratio=(3 / 4, 4 / 3),
    gen: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """Per-image crop boxes (top, left, h, w) with torchvision ``RandomResizedCrop.get_params``'s law,
    on the generator's device (no host synchronisation: the 10 attempts are evaluated at once)."""
    device = _rng_device(gen, device)
    area = height * width
    attempts = 10
    target_area = area * _rand(gen, (n, attempts), scale[0], scale[1], device)
    log_r = _rand(gen, (n, attempts), math.log(ratio[0]), math.log(ratio[1]), device)
    ar = torch.exp(log_r)
    w = torch.round(torch.sqrt(target_area * ar))
    h = torch.round(torch.sqrt(target_area / ar))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, dtype=torch.long, device=device))
    # fallback: central crop with the ratio clamped into range (torchvision's behaviour)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    sel = first.clamp(min=0).unsqueeze(1)
    hh = torch.where(first >= 0, h.gather(1, sel).squeeze(1), float(fh))
    ww = torch.where(first >= 0, w.gather(1, sel).squeeze(1), float(fw))
    u = torch.rand((n, 2), generator=gen, device=device)
    top = torch.where(first >= 0, torch.floor(u[:, 0] * (height - hh + 1)), float((height - fh) // 2))
    left = torch.where(first >= 0, torch.floor(u[:, 1] * (width - ww + 1)), float((width - fw) // 2))
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
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
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
    photometric ops, flip excluded, run here. ``masked`` chooses how drawn ops are applied (see the
    module docstring): ``None`` = masked on accelerators, index subsets on the CPU.
    """

    def __init__(self, data_cfg, crop: bool = True, crop_scale=None, color: bool = True, masked: Optional[bool] = None):
        self.size = data_cfg.image_size
        self.scale = crop_scale if crop_scale is not None else (data_cfg.crop_min_scale, 1.0)
        self.crop = crop
        self.color = color
        self.masked = masked
        self.jitter_p = data_cfg.color_jitter_prob
        self.jitter = tuple(data_cfg.color_jitter)
        self.gray_p = data_cfg.grayscale_prob
        self.blur_p = data_cfg.blur_prob
        self.blur_sigma = tuple(data_cfg.blur_sigma)
        self.flip_p = data_cfg.flip_prob
        self.mean = torch.tensor(data_cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(data_cfg.std).view(1, 3, 1, 1)
        self._consts: dict = {}
        self.apply_masked = self._apply_masked  # replaced by a compiled version by ``compile()``

    def compile(self) -> None:
        """Fuse the masked application (elementwise ops over the batch) with ``torch.compile``."""
        self.apply_masked = torch.compile(self._apply_masked, dynamic=False)

    def _mean_std(self, device):
        if device not in self._consts:
            self._consts[device] = (self.mean.to(device), self.std.to(device))
        return self._consts[device]

    def sample(self, n: int, height: int, width: int, gen: Optional[torch.Generator], device) -> dict:
        """Every random parameter of a batch, drawn in a fixed order on the generator's device."""
        dev = _rng_device(gen, device)
        p: dict = {}
        if self.crop:
            p["boxes"] = sample_resized_crops(n, height, width, self.scale, gen=gen, device=dev)
            p["flip"] = torch.rand(n, generator=gen, device=dev) < self.flip_p
        if self.color:
            bri, con, sat, hue = self.jitter
            p["jitter"] = torch.rand(n, generator=gen, device=dev) < self.jitter_p
            p["factors"] = torch.stack(
                [
                    _rand(gen, n, max(0.0, 1 - bri), 1 + bri, dev),
                    _rand(gen, n, max(0.0, 1 - con), 1 + con, dev),
                    _rand(gen, n, max(0.0, 1 - sat), 1 + sat, dev),
                    _rand(gen, n, -hue, hue, dev),
                ]
            )
            p["order"] = torch.argsort(torch.rand(n, 4, generator=gen, device=dev), dim=1)  # random op order
            p["gray"] = torch.rand(n, generator=gen, device=dev) < self.gray_p
            if self.blur_p > 0:
                p["blur"] = torch.rand(n, generator=gen, device=dev) < self.blur_p
                lo, hi = self.blur_sigma
                p["sigma"] = _rand(gen, n, lo, hi, dev)
        return p

    def __call__(self, images: torch.Tensor, gen: Optional[torch.Generator] = None) -> torch.Tensor:
        dev = images.device
        p = self.sample(images.shape[0], images.shape[2], images.shape[3], gen, dev)
        p = {k: v.to(dev, non_blocking=True) for k, v in p.items()}
        masked = self.masked if self.masked is not None else dev.type != "cpu"
        if masked:
            return self.apply_masked(images, p)
        x = images.float().div_(255)
        if self.crop:
            x = resized_crop_flip(x, p["boxes"], self.size, p["flip"])
        if self.color:
            x = self._photometric_subsets(x, p)
        mean, std = self._mean_std(x.device)
        return (x - mean) / std

    def _enabled(self, op_id: int) -> bool:
        return self.jitter[op_id] != 0

    def _photometric_subsets(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for step in range(4):
            for op_id, op in enumerate(ops):
                if not self._enabled(op_id):
                    continue
                idx = torch.nonzero(p["jitter"] & (p["order"][:, step] == op_id)).flatten()
                if idx.numel():
                    x[idx] = op(x[idx], p["factors"][op_id][idx])
        if p["gray"].any():
            x[p["gray"]] = _gray(x[p["gray"]]).expand(-1, 3, -1, -1)
        if "blur" in p:
            idx = torch.nonzero(p["blur"]).flatten()
            if idx.numel():
                x[idx] = gaussian_blur(x[idx], p["sigma"][idx], self.blur_sigma[1])
        return x

    def _apply_masked(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        """The same function as the subset path, with no data-dependent control flow. Brightness,
        contrast and saturation are one blend ``f x + (1 - f) t`` with a per-image target t (0, the
        mean grey, the grey image), so each of the four jitter steps costs one blend and one hue op."""
        x = images.float().div_(255)
        if self.crop:
            x = resized_crop_flip(x, p["boxes"], self.size, p["flip"])
        if self.color:
            one = torch.ones((), device=x.device)
            zero = torch.zeros((), device=x.device)
            for step in range(4):
                op = p["order"][:, step]
                on = p["jitter"]
                blend = on & (op < 3)
                for op_id in range(3):
                    if not self._enabled(op_id):
                        blend = blend & (op != op_id)
                f = torch.where(blend, p["factors"].gather(0, op.clamp(max=2).view(1, -1)).squeeze(0), one)
                g = _gray(x)
                target = torch.where(
                    (op == 2).view(-1, 1, 1, 1),
                    g,
                    torch.where((op == 1).view(-1, 1, 1, 1), g.mean(dim=(1, 2, 3), keepdim=True), zero),
                )
                y = (f.view(-1, 1, 1, 1) * x + (1 - f.view(-1, 1, 1, 1)) * target).clamp(0, 1)
                x = torch.where(blend.view(-1, 1, 1, 1), y, x)
                if self._enabled(3):
                    x = torch.where((on & (op == 3)).view(-1, 1, 1, 1), adjust_hue(x, p["factors"][3]), x)
            x = torch.where(p["gray"].view(-1, 1, 1, 1), _gray(x).expand(-1, 3, -1, -1), x)
            if "blur" in p:
                x = torch.where(p["blur"].view(-1, 1, 1, 1), gaussian_blur(x, p["sigma"], self.blur_sigma[1]), x)
        mean, std = self._mean_std(x.device)
        return (x - mean) / std


class EvalTransform:
    """uint8 batch -> normalised float batch for evaluation (crops were done by the loader if needed)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, gen=None) -> torch.Tensor:
        x = images.float().div_(255)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)
