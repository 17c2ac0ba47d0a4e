"""Batch loaders yielding uint8 image batches; augmentation runs batched afterwards.

* In-memory datasets (npz, CIFAR, STL-10, demo): :class:`ArrayLoader` indexes the uint8 tensor
  directly: no worker processes, no per-image Python. With ``device`` set (pretraining on a GPU, see
  :func:`resolve_device_resident`) the whole uint8 array lives on that device: each epoch's order is
  copied once, and a batch is an index gather there, with no host-to-device copy per step.
* File datasets (ImageFolder): a ``torch.utils.data.DataLoader`` decodes images in workers. For
  pretraining each worker takes the two random resized crops + flips per image (they need the
  full-resolution image); colour ops run batched afterwards. For evaluation it resizes (shorter side
  to size/0.875) and centre-crops. The crops and flips of image ``i`` in epoch ``e`` are drawn from a
  generator seeded with ``(seed, e, i)`` alone: no worker RNG state exists to lose, so a resumed run
  takes the same crops as an uninterrupted one for any number of workers. An unreadable image stops
  the loader with one line naming the file (the worker's traceback is not passed on).

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


def resolve_device_resident(
    flag: Optional[bool], ds: ImageDataset, device: torch.device, max_fraction: float = 0.25
) -> bool:
    """Keep an in-memory dataset on the training device? ``flag`` (``data.device_resident``) wins; auto
    (None) = yes on an accelerator when the uint8 array takes at most ``max_fraction`` of its memory."""
    if not ds.in_memory:
        if flag:
            raise UserError(
                "data.device_resident=true needs an in-memory dataset (npz, CIFAR, STL-10, demo); "
                f"{ds.name} is read from files"
            )
        return False
    if flag is not None:
        return bool(flag)
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return ds.images is not None and ds.images.nbytes <= max_fraction * total


class ArrayLoader:
    """Batches of an in-memory dataset: dict(images=uint8 (B,3,H,W), labels=int64 (B,), index=(B,)),
    on ``device`` when given (the array is copied there once), else on the host."""

    def __init__(
        self,
        ds: ImageDataset,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        device: Optional[torch.device] = None,
    ):
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


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one image's random crops in one epoch: a pure function of its arguments."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))
    return g


class _FileSampler(torch.utils.data.Sampler):
    """This rank's indices for the epoch, each as ``(epoch, index)``: the dataset seeds its crops with them."""

    def __init__(self, sharder: _Sharder):
        self.sharder = sharder

    def __iter__(self):  # the DataLoader's own drop_last cuts the last partial batch
        e = self.sharder.epoch
        return iter([(e, i) for i in self.sharder.indices().tolist()])

    def __len__(self):
        return self.sharder.per_rank


class _Unreadable:
    """What a worker returns for an image it cannot read (the main process raises the error)."""

    def __init__(self, message: str):
        self.message = message


class _FileDataset(torch.utils.data.Dataset):
    def __init__(
        self, ds: ImageDataset, mode: str, size: int, crop_scale=(0.2, 1.0), flip_p: float = 0.5, seed: int = 0
    ):
        self.ds, self.mode, self.size, self.seed = ds, mode, size, seed
        self.crop_scale, self.flip_p = tuple(crop_scale), flip_p

    def __len__(self):
        return len(self.ds)

    def _to_tensor(self, im) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)

    def _random_crop(self, im, gen: torch.Generator):
        """RandomResizedCrop(size, scale) + RandomHorizontalFlip(flip_p) with torchvision's laws, drawn
        from ``gen`` (torchvision's transforms draw from the worker's global RNG)."""
        from torchvision.transforms.v2 import functional as F

        from simsiam_kit.data.transforms import sample_resized_crops

        top, left, h, w = (int(v) for v in sample_resized_crops(1, im.height, im.width, self.crop_scale, gen=gen)[0])
        out = F.resized_crop(im, top, left, h, w, [self.size, self.size], antialias=True)
        if float(torch.rand(1, generator=gen)) < self.flip_p:
            out = F.horizontal_flip(out)
        return out

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        try:
            im = self.ds.load_pil(i)
        except UserError as e:
            return _Unreadable(str(e))
        if im is None:
            return None
        if self.mode in ("two_view", "train_crop"):
            gen = sample_generator(self.seed, epoch, i)
            out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
            if self.mode == "two_view":
                out = (self._to_tensor(self._random_crop(im, gen)), self._to_tensor(self._random_crop(im, gen)))
            else:
                out = self._to_tensor(self._random_crop(im, gen))
        else:  # the one evaluation rule (image_settings.eval_resize_crop), shared with embed and ONNX
            from simsiam_kit.image_settings import eval_resize_crop

            out = self._to_tensor(eval_resize_crop(im, self.size))
        return out, int(self.ds.labels[i]), i


def _collate(items):
    for it in items:
        if isinstance(it, _Unreadable):
            return {"error": it.message}
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return {"images": None, "labels": None, "index": None, "skipped": skipped}
    imgs, labels, idx = zip(*good)
    images: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    if isinstance(imgs[0], tuple):
        images = (torch.stack([a for a, _ in imgs]), torch.stack([b for _, b in imgs]))
    else:
        images = torch.stack(imgs)
    return {"images": images, "labels": torch.tensor(labels), "index": torch.tensor(idx), "skipped": skipped}


class FileLoader:
    def __init__(
        self,
        ds: ImageDataset,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        mode: str,
        size: int,
        workers: int,
        crop_scale=(0.2, 1.0),
        flip_p: float = 0.5,
    ):
        self.sharder = _Sharder(len(ds), batch_size, shuffle, drop_last, seed, shard=shuffle)
        self.two_views_in_loader = mode == "two_view"
        self.dl = torch.utils.data.DataLoader(
            _FileDataset(ds, mode, size, crop_scale, flip_p, seed),
            batch_size=batch_size,
            sampler=_FileSampler(self.sharder),
            num_workers=workers,
            collate_fn=_collate,
            drop_last=drop_last,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            # its own generator: creating the workers' base seed must not draw from torch's global RNG
            generator=torch.Generator().manual_seed(seed),
        )

    def set_epoch(self, epoch: int) -> None:
        self.sharder.set_epoch(epoch)

    def __len__(self):
        return len(self.sharder)

    def __iter__(self):
        for batch in self.dl:
            if "error" in batch:  # raised here, not in the worker: one line, no worker traceback
                raise UserError(batch["error"])
            yield batch


def make_loader(
    ds: ImageDataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    mode: str = "eval",
    image_size: Optional[int] = None,
    workers: int = 2,
    crop_scale=(0.2, 1.0),
    flip_p: float = 0.5,
    device: Optional[torch.device] = None,
):
    """A loader of uint8 batches. ``mode``: "two_view" (pretraining), "train_crop" (linear probe), "eval".
    ``device``: keep an in-memory dataset there (see :class:`ArrayLoader`); ignored for file datasets."""
    if ds.in_memory:
        return ArrayLoader(ds, batch_size, shuffle=train, drop_last=train, seed=seed, device=device)
    return FileLoader(
        ds,
        batch_size,
        shuffle=train,
        drop_last=train,
        seed=seed,
        mode=mode,
        size=image_size or 224,
        workers=workers,
        crop_scale=crop_scale,
        flip_p=flip_p,
    )
