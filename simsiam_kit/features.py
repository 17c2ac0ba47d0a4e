"""Feature extraction with a frozen backbone: eval mode, no_grad, batched.

One rule for every consumer (the pretraining kNN monitor and its summary, ``eval knn``, ``eval linear``),
so the same backbone gets the same features, and the same kNN accuracy, from each of them:

* precision: fp32 unless the command asks for another one (:func:`feature_precision`): the training
  precision of a run does not leak into its evaluation, and figures do not depend on whether a CPU has
  native bf16;
* memory layout: contiguous (channels_last changes the convolution kernels, hence the last bits);
* in-memory images at another size are brought to it once, to uint8, by the evaluation rule that file
  datasets, ``embed`` and the ONNX runtime use (:func:`simsiam_kit.image_settings.eval_resize_crop`:
  shorter side to size / 0.875, PIL bilinear, centre crop);
* :data:`FEATURE_BATCH` images per forward (``config.DEFAULT_FEATURE_BATCH``).
"""

from __future__ import annotations

import numpy as np
import torch

from simsiam_kit.config import DEFAULT_FEATURE_BATCH, IMAGENET_MEAN, IMAGENET_STD
from simsiam_kit.data.datasets import ImageDataset
from simsiam_kit.data.loaders import make_loader
from simsiam_kit.data.transforms import EvalTransform
from simsiam_kit.errors import UserError
from simsiam_kit.utils.device import Precision, resolve_precision

FEATURE_BATCH = DEFAULT_FEATURE_BATCH  # images per forward: the eval commands' --batch-size default, the monitor's


def feature_precision(name: str, device: torch.device) -> Precision:
    """The precision features are extracted at: ``auto`` means fp32 (see the module docstring); an
    explicit ``fp32``/``bf16``/``fp16`` is checked and used as given."""
    return resolve_precision("fp32" if name == "auto" else name, device)


def eval_resized(ds: ImageDataset, size: int) -> ImageDataset:
    """An in-memory dataset brought to ``size`` by the evaluation rule (unchanged when already that size)."""
    from simsiam_kit.image_settings import eval_resize_crop

    if ds.images is None or (ds.images.shape[1] == size and ds.images.shape[2] == size):
        return ds
    images = np.stack([eval_resize_crop(im, size) for im in ds.images])
    return ImageDataset(
        name=ds.name,
        labels=ds.labels,
        ids=ds.ids,
        classes=ds.classes,
        images=np.ascontiguousarray(images),
        skip_bad_images=ds.skip_bad_images,
    )


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    ds: ImageDataset,
    device: torch.device,
    batch_size: int = FEATURE_BATCH,
    precision: Precision | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
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
    if image_size and ds.in_memory:
        ds = eval_resized(ds, int(image_size))  # the evaluation rule, as for files and embed: uint8, once
    loader = make_loader(ds, batch_size, train=False, mode="eval", image_size=image_size, workers=workers)
    tf = EvalTransform(mean, std)
    precision = precision or Precision("fp32", device.type)
    feats, labels, index = [], [], []
    try:
        for batch in loader:
            if batch["images"] is None:
                continue
            x = tf(batch["images"].to(device, non_blocking=True))
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
    if not feats:  # every image skipped as unreadable: the callers say so
        empty = torch.zeros(0, dtype=torch.int64, device=out_device)
        return torch.zeros((0, 0), device=out_device), empty, empty.clone()
    out_f, out_l, out_i = torch.cat(feats), torch.cat(labels), torch.cat(index)
    bad = ~torch.isfinite(out_f).all(dim=1)  # one reduction, one host sync per extraction
    if bad.any():
        rows = torch.nonzero(bad).flatten()
        first = ds.ids[int(out_i[rows[0]])]
        raise UserError(
            f"the backbone's output is not finite (NaN or inf) for {len(rows)} of {len(out_f)} images of "
            f"{ds.name} (first: {first}); refused: NaN features make a NaN index and meaningless neighbours"
        )
    return out_f, out_l, out_i


def save_features(out_dir, feats: torch.Tensor, labels: torch.Tensor, ids: list) -> None:
    """``features.npy``, ``labels.npy`` and ``ids.json`` in ``out_dir``, each written atomically (a full disk is
    one line naming the file)."""
    import json
    from pathlib import Path

    from simsiam_kit.utils.io import atomic_save_npy, atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(out_dir / "features.npy", feats.numpy().astype(np.float32))
    atomic_save_npy(out_dir / "labels.npy", labels.numpy().astype(np.int64))
    atomic_write_text(out_dir / "ids.json", json.dumps([i if isinstance(i, (int, str)) else str(i) for i in ids]))
