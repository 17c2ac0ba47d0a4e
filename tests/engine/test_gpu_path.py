"""The GPU fast path, checked on the CPU: the masked (sync-free) augmentation computes the same images as
the subset path, device-resident batches equal host batches, per-step metrics stay on the device, and a
non-finite loss found late is still never checkpointed."""

import math
import sys

import pytest
import torch

from simsiam_kit.config import DataConfig, load_pretrain_config
from simsiam_kit.data import load_dataset
from simsiam_kit.data.loaders import make_loader, resolve_device_resident
from simsiam_kit.data.transforms import BatchAugment
from simsiam_kit.engine.hooks import EpochAverages, Throughput
from simsiam_kit.errors import TrainingDiverged, UserError
from simsiam_kit.utils.device import resolve_compile

from helpers import REPO


def _images(cifar_val, n=96):
    ds = load_dataset(f"{cifar_val}[:{n}]")
    return torch.from_numpy(ds.images).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(image_size=32),  # the CIFAR recipe (no blur)
        DataConfig(image_size=24, blur_prob=0.5),  # ImageNet-style blur
        DataConfig(color_jitter=(0.4, 0.0, 0.4, 0.0), grayscale_prob=0.5),  # disabled jitter components
        DataConfig(color_jitter=(0.0, 0.4, 0.0, 0.1), color_jitter_prob=1.0),
    ],
)
def test_masked_augmentation_equals_subset_path(cifar_val, cfg):
    imgs = _images(cifar_val)
    ref = BatchAugment(cfg, masked=False)(imgs, torch.Generator().manual_seed(5))
    got = BatchAugment(cfg, masked=True)(imgs, torch.Generator().manual_seed(5))
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    # and it is not trivially equal: a different seed gives different views
    other = BatchAugment(cfg, masked=True)(imgs, torch.Generator().manual_seed(6))
    assert (other - ref).abs().max() > 0.1


def test_masked_augmentation_without_crop_or_colour(cifar_val):
    imgs = _images(cifar_val, 16)
    cfg = DataConfig(image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    for kw in (dict(crop=False), dict(color=False), dict(crop=False, color=False)):
        a = BatchAugment(cfg, masked=False, **kw)(imgs, torch.Generator().manual_seed(1))
        b = BatchAugment(cfg, masked=True, **kw)(imgs, torch.Generator().manual_seed(1))
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    # no crop, no colour: exactly the input scaled to [0, 1]
    assert torch.equal(b, imgs.float() / 255)


def test_device_resident_loader_gives_the_same_batches(cifar_val):
    ds = load_dataset(f"{cifar_val}[:100]")
    host = make_loader(ds, 32, train=True, seed=3)
    dev = make_loader(ds, 32, train=True, seed=3, device=torch.device("cpu"))
    assert dev.device is not None and host.device is None
    for epoch in (0, 1):
        host.set_epoch(epoch)
        dev.set_epoch(epoch)
        hb, db = list(host), list(dev)
        assert len(hb) == len(db) == 3  # drop_last: 100 // 32
        for a, b in zip(hb, db):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["images"], b["images"])
            assert torch.equal(a["labels"], b["labels"])
            assert torch.equal(b["images"], torch.from_numpy(ds.images[b["index"].numpy()]).permute(0, 3, 1, 2))


def test_resolve_device_resident(cifar_val, tmp_path):
    ds = load_dataset(f"{cifar_val}[:10]")
    cpu = torch.device("cpu")
    assert resolve_device_resident(None, ds, cpu) is False  # auto: only on accelerators
    assert resolve_device_resident(True, ds, cpu) is True and resolve_device_resident(False, ds, cpu) is False
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    files = load_dataset(str(tmp_path))
    assert resolve_device_resident(None, files, cpu) is False
    with pytest.raises(UserError, match="device_resident=true needs an in-memory dataset"):
        resolve_device_resident(True, files, cpu)


def test_config_switches_parse():
    cfg = load_pretrain_config("cifar10_resnet18", ["train.compile=true", "data.device_resident=false"])
    assert cfg.train.compile is True and cfg.data.device_resident is False
    cfg = load_pretrain_config("cifar10_resnet18", ["train.compile=auto"])
    assert cfg.train.compile is None
    with pytest.raises(UserError, match="train.compile"):
        load_pretrain_config("cifar10_resnet18", ["train.compile=3"])
    assert resolve_compile(True, torch.device("cpu")) is True
    assert resolve_compile(None, torch.device("cpu")) is False


class _FakeTrainer:
    def __init__(self, steps):
        self.steps_per_epoch, self.epoch, self.global_step = steps, 0, 0
        self.step_in_epoch, self.step_start = 0, 0.0
        self.outputs, self.epoch_metrics, self.state = {}, {}, {}


def test_epoch_averages_keep_tensors_and_match_floats():
    t = _FakeTrainer(3)
    h = EpochAverages()
    h.before_epoch(t)
    losses = [torch.tensor(-0.5), torch.tensor(-0.25), torch.tensor(-0.125)]
    for i, v in enumerate(losses):
        t.outputs = {"loss": v, "images": 8, "skipped": i}
        h.after_step(t)
        assert torch.is_tensor(h.sums["loss"])  # summed where it lives, read once at the end
    h.after_epoch(t)
    assert t.epoch_metrics["loss"] == pytest.approx(-0.875 / 3)
    assert t.epoch_metrics["skipped"] == pytest.approx(1.0)


def test_throughput_counts_steps_after_the_first(monkeypatch):
    import simsiam_kit.engine.hooks as hooks

    clock = iter([10.0, 11.0, 12.0, 14.0])  # end of step 1, step 2, step 3, epoch end
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: next(clock))
    t = _FakeTrainer(3)
    h = Throughput()
    h.before_epoch(t)
    for _ in range(3):
        t.outputs = {"images": 8}
        h.after_step(t)
    h.after_epoch(t)
    assert t.epoch_metrics["images_per_s"] == pytest.approx(16 / 4.0)  # steps 2-3: 16 images in 10 -> 14 s


class _NaNAfter(torch.nn.Module):
    """A SimSiam stand-in whose outputs turn NaN from the ``bad``-th call on."""

    def __init__(self, bad):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))
        self.calls, self.bad = 0, bad

    def forward(self, x1, x2):
        self.calls += 1
        z1 = x1.flatten(1)[:, :4] * self.w
        z2 = x2.flatten(1)[:, :4] * self.w
        if self.calls >= self.bad:
            z1 = z1 * float("nan")
        return z1, z2, z2.detach() + 1, z1.detach() + 1


def test_deferred_nonfinite_check_raises_at_the_check():
    from simsiam_kit.pretrain import PretrainStep
    from simsiam_kit.utils.device import Precision

    cfg = load_pretrain_config("demo", ["train.log_every=3"])
    model = _NaNAfter(bad=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    aug = BatchAugment(DataConfig(image_size=8), color=False)
    step = PretrainStep(
        model,
        opt,
        aug,
        Precision("fp32", "cpu"),
        torch.device("cpu"),
        False,
        torch.Generator().manual_seed(0),
        cfg,
        check_every=3,
    )
    t = _FakeTrainer(10)
    batch = {"images": torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)}
    step(batch, t)  # finite
    t.global_step = 1
    step(batch, t)  # NaN, recorded, not yet checked
    t.global_step = 2
    with pytest.raises(TrainingDiverged, match="non-finite .* at or before epoch 1, step 3"):
        step(batch, t)  # the third step checks
    # the checkpoint writer's check sees a NaN recorded since the last check
    t.global_step = 3
    step(batch, t)
    with pytest.raises(TrainingDiverged):
        step.check(t)
    step.check(t)  # nothing new since: passes


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path, cifar_val):
    """benchmarks/gpu_check.py end to end at toy size on the CPU (the sections the GPU run depends on)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    gpu_check.main(["--smoke", "--out", str(tmp_path), "--only", "pretrain,epoch", "--device", "cpu"])
    import json

    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    pre = rep["sections"]["pretrain"]
    for name in ("eager, data on device", "eager, host data + copy"):
        assert pre[name]["images_per_s"] > 0 and "error" not in pre[name]
    curve = pre["eager, data on device"]["loss_per_step"]
    assert len(curve) == 4 and all(-1.0 <= v <= 1.0 for v in curve)
    ep = rep["sections"]["epoch"]
    assert "error" not in ep and 0 <= ep["knn_top1"] <= 100 and ep["knn_monitor_s"] > 0
    assert math.isfinite(rep["projected_800_epochs_min"])


def test_resolve_workers(monkeypatch):
    import simsiam_kit.utils.device as d

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert d.resolve_workers(5, cuda) == 5 and d.resolve_workers(0, cpu) == 0
    assert d.resolve_workers(None, cpu) == 2  # CPU training: the cores belong to the training threads
    monkeypatch.setattr(d, "usable_cores", lambda: 16)
    assert d.resolve_workers(None, cuda) == 15  # one core left for the training loop
    assert d.resolve_workers(None, cuda, local_processes=8) == 2  # 16 cores / 8 GPUs - 1 = 1 -> at least 2
    monkeypatch.setattr(d, "usable_cores", lambda: 96)
    assert d.resolve_workers(None, cuda) == 16 and d.resolve_workers(None, cuda, local_processes=4) == 16
    assert d.resolve_workers(None, cuda, local_processes=8) == 11
    with pytest.raises(UserError, match="data.workers must be >= 0"):
        d.resolve_workers(-1, cpu)
