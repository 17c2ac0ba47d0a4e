"""Batch loaders yielding uint8 image batches; augmentation runs batched afterwards.

* In-memory datasets (npz, CIFAR, STL-10, demo): :class:`ArrayLoader` indexes the uint8 tensor
  directly: no worker processes, no per-image Python. With ``device`` set (pretraining on a GPU, see
  :func:`resolve_device_resident`) the whole uint8 array lives on that device: each epoch's order is
  copied once, and a batch is an index gather there, with no host-to-device copy per step.
* File datasets (ImageFolder): a ``torch.utils.data.DataLoader`` decodes images in workers. For
  pretraining each worker takes the two random resized crops + flips per image (they need the
  full-resolution image); colour ops run batched afterwards. For evaluation it resizes (shorter side
  to size/0.875) and centre-crops.

Training loaders shard by rank (every rank sees a disjoint 1/world slice of a seeded permutation,
like ``DistributedSampler``); evaluation loaders are not sharded. Both expose ``set_epoch``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from simsiam_kit.data.datasets import ImageDataset
from simsiam_kit.errors import UserError
from simsiam_kit.utils import dist


class _Sharder:
    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int, shard: bool = True):
        self.n, self.batch_size, self.shuffle, self.drop_last, self.seed = n, batch_size, shuffle, drop_last, seed
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if shard else (0, 1)
        self.epoch = 0
        per_rank = n // self.world if drop_last else math.ceil(n / self.world)
        self.per_rank = per_rank
        if drop_last and per_rank < batch_size:
            raise UserError(
                f"batch size {batch_size * self.world} (global) is larger than the dataset ({n} images); "
                "lower optim.batch_size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def indices(self) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n)
        else:
            order = np.arange(self.n)
        if not self.drop_last and len(order) % self.world:
            order = np.concatenate([order, order[: self.world - len(order) % self.world]])
        mine = order[self.rank :: self.world][: self.per_rank]
        return mine


def resolve_device_resident(flag: Optional[bool], ds: ImageDataset, device: torch.device,
                            max_fraction: float = 0.25) -> bool:
    """Keep an in-memory dataset on the training device? ``flag`` (``data.device_resident``) wins; auto
    (None) = yes on an accelerator when the uint8 array takes at most ``max_fraction`` of its memory."""
    if not ds.in_memory:
        if flag:
            raise UserError("data.device_resident=true needs an in-memory dataset (npz, CIFAR, STL-10, demo); "
                            f"{ds.name} is read from files")
        return False
    if flag is not None:
        return bool(flag)
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return ds.images.nbytes <= max_fraction * total


class ArrayLoader:
    """Batches of an in-memory dataset: dict(images=uint8 (B,3,H,W), labels=int64 (B,), index=(B,)),
    on ``device`` when given (the array is copied there once), else on the host."""

    def __init__(self, ds: ImageDataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0,
                 device: Optional[torch.device] = None):
        if not ds.in_memory:
            raise ValueError("ArrayLoader needs an in-memory dataset")
        self.device = device
        images, labels = torch.from_numpy(ds.images), torch.from_numpy(ds.labels)
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        self.images = images.permute(0, 3, 1, 2)  # view: N,3,H,W (channels-last memory)
        self.labels = labels
        self.sharder = _Sharder(len(ds), batch_size, shuffle, drop_last, seed, shard=shuffle)
        self.two_views_in_loader = False

    def set_epoch(self, epoch: int) -> None:
        self.sharder.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sharder)

    def __iter__(self):
        order = torch.from_numpy(self.sharder.indices())
        if self.device is not None:
            order = order.to(self.device)  # one copy per epoch
        bs = self.sharder.batch_size
        for s in range(len(self)):
            idx = order[s * bs : (s + 1) * bs]
            yield {"images": self.images[idx].contiguous(), "labels": self.labels[idx], "index": idx, "skipped": 0}


class _FileSampler(torch.utils.data.Sampler):
    def __init__(self, sharder: _Sharder):
        self.sharder = sharder

    def __iter__(self):  # the DataLoader's own drop_last cuts the last partial batch
        return iter(self.sharder.indices().tolist())

    def __len__(self):
        return self.sharder.per_rank


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, ds: ImageDataset, mode: str, size: int, crop_scale=(0.2, 1.0), flip_p: float = 0.5):
        self.ds, self.mode, self.size = ds, mode, size
        from torchvision.transforms import v2 as T

        if mode in ("two_view", "train_crop"):
            self.tf = T.Compose([T.RandomResizedCrop(size, scale=crop_scale, antialias=True),
                                 T.RandomHorizontalFlip(flip_p)])
        else:
            self.tf = T.Compose([T.Resize(int(round(size / 0.875)), antialias=True), T.CenterCrop(size)])

    def __len__(self):
        return len(self.ds)

    def _to_tensor(self, im) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)

    def __getitem__(self, i):
        im = self.ds.load_pil(i)
        if im is None:
            return None
        if self.mode == "two_view":
            out = (self._to_tensor(self.tf(im)), self._to_tensor(self.tf(im)))
        else:
            out = self._to_tensor(self.tf(im))
        return out, int(self.ds.labels[i]), i


def _collate(items):
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return {"images": None, "labels": None, "index": None, "skipped": skipped}
    imgs, labels, idx = zip(*good)
    if isinstance(imgs[0], tuple):
        images = (torch.stack([a for a, _ in imgs]), torch.stack([b for _, b in imgs]))
    else:
        images = torch.stack(imgs)
    return {"images": images, "labels": torch.tensor(labels), "index": torch.tensor(idx), "skipped": skipped}


class FileLoader:
    def __init__(self, ds: ImageDataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int, mode: str,
                 size: int, workers: int, crop_scale=(0.2, 1.0), flip_p: float = 0.5):
        self.sharder = _Sharder(len(ds), batch_size, shuffle, drop_last, seed, shard=shuffle)
        self.two_views_in_loader = mode == "two_view"
        self.dl = torch.utils.data.DataLoader(
            _FileDataset(ds, mode, size, crop_scale, flip_p), batch_size=batch_size,
            sampler=_FileSampler(self.sharder), num_workers=workers, collate_fn=_collate,
            drop_last=drop_last, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def set_epoch(self, epoch: int) -> None:
        self.sharder.set_epoch(epoch)

    def __len__(self):
        return len(self.sharder)

    def __iter__(self):
        return iter(self.dl)


def make_loader(ds: ImageDataset, batch_size: int, *, train: bool, seed: int = 0, mode: str = "eval",
                image_size: Optional[int] = None, workers: int = 2, crop_scale=(0.2, 1.0), flip_p: float = 0.5,
                device: Optional[torch.device] = None):
    """A loader of uint8 batches. ``mode``: "two_view" (pretraining), "train_crop" (linear probe), "eval".
    ``device``: keep an in-memory dataset there (see :class:`ArrayLoader`); ignored for file datasets."""
    if ds.in_memory:
        return ArrayLoader(ds, batch_size, shuffle=train, drop_last=train, seed=seed, device=device)
    return FileLoader(ds, batch_size, shuffle=train, drop_last=train, seed=seed, mode=mode,
                      size=image_size or 224, workers=workers, crop_scale=crop_scale, flip_p=flip_p)
