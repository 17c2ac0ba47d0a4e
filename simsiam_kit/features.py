"""Feature extraction with a frozen backbone: eval mode, no_grad, batched, AMP on GPU."""

from __future__ import annotations

import numpy as np
import torch

from simsiam_kit.data.datasets import ImageDataset
from simsiam_kit.data.loaders import make_loader
from simsiam_kit.data.transforms import EvalTransform
from simsiam_kit.utils.device import Precision


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    ds: ImageDataset,
    device: torch.device,
    batch_size: int = 256,
    precision: Precision | None = None,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    image_size: int | None = None,
    workers: int = 2,
    channels_last: bool = False,
    normalize: bool = True,
    out_device="cpu",
):
    """Return (features float32 (N, D) l2-normalised unless ``normalize=False``, labels (N,), indices (N,)),
    on ``out_device`` (the training device keeps the pretraining kNN monitor's search there).

    The backbone is put in ``eval()`` (BatchNorm uses running statistics) and restored afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    loader = make_loader(ds, batch_size, train=False, mode="eval", image_size=image_size, workers=workers)
    tf = EvalTransform(mean, std)
    precision = precision or Precision("fp32", device.type)
    feats, labels, index = [], [], []
    try:
        for batch in loader:
            if batch["images"] is None:
                continue
            x = tf(batch["images"].to(device, non_blocking=True))
            if image_size and ds.in_memory and x.shape[-1] != image_size:
                x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                                    align_corners=False, antialias=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision.autocast():
                f = backbone(x)
            f = f.float()
            if normalize:
                f = torch.nn.functional.normalize(f, dim=1)
            feats.append(f.to(out_device))
            labels.append(batch["labels"].to(out_device))
            index.append(batch["index"].to(out_device))
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels), torch.cat(index)


def save_features(out_dir, feats: torch.Tensor, labels: torch.Tensor, ids: list) -> None:
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "features.npy", feats.numpy().astype(np.float32))
    np.save(out_dir / "labels.npy", labels.numpy().astype(np.int64))
    (out_dir / "ids.json").write_text(json.dumps([i if isinstance(i, (int, str)) else str(i) for i in ids]))
