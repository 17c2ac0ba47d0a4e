import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from simsiam_kit.config import DataConfig
from simsiam_kit.data import load_dataset, parse_spec
from simsiam_kit.data.loaders import make_loader
from simsiam_kit.data.transforms import (
    BatchAugment,
    adjust_hue,
    gaussian_blur,
    resized_crop_flip,
    sample_resized_crops,
)
from simsiam_kit.errors import UserError


def test_parse_spec_slices():
    assert parse_spec("a/b.npz[:100]") == ("a/b.npz", slice(None, 100))
    assert parse_spec("cifar10:test[10:20]") == ("cifar10:test", slice(10, 20))
    assert parse_spec("demo") == ("demo", None)


def test_npz_and_slice(cifar_val):
    ds = load_dataset(f"{cifar_val}[:10]")
    assert len(ds) == 10 and ds.images.shape == (10, 32, 32, 3) and ds.classes[0] == "airplane"
    full = np.load(cifar_val)
    assert np.array_equal(ds.labels, full["labels"][:10])


def test_demo_dataset_is_real_digits():
    tr, va = load_dataset("demo:train"), load_dataset("demo:val")
    assert len(tr) == 4000 and len(va) == 1000
    assert np.bincount(va.labels).tolist() == [100] * 10
    assert not set(tr.ids) & set(va.ids)
    # real digits: dark background, bright strokes, a 2-pixel zero border from the 28->32 padding
    assert tr.images[:, :2].max() == 0 and tr.images.mean() < 60 and tr.images.max() == 255


def test_image_folder_and_corrupt_file(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = load_dataset(str(tmp_path))
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.ids[0] == "a/0.png"
    bad = tmp_path / "b" / "9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    ds = load_dataset(str(tmp_path))
    with pytest.raises(UserError, match="9.png"):
        [ds.load_pil(i) for i in range(len(ds))]
    ds = load_dataset(str(tmp_path), skip_bad_images=True)
    batches = list(make_loader(ds, 7, train=False, workers=0, image_size=8))
    assert batches[0]["skipped"] == 1 and batches[0]["images"].shape[0] == 6


def test_missing_and_empty(tmp_path):
    with pytest.raises(UserError, match="dataset not found"):
        load_dataset(str(tmp_path / "nope.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="is empty"):
        load_dataset("demo:val[5:5]")


def _fake_cifar10(root):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_torchvision_cifar_without_network(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    # no files and no download switch: a clear error, and no download is attempted
    calls = []
    monkeypatch.setattr(tvd.utils, "download_and_extract_archive", lambda *a, **k: calls.append(a))
    with pytest.raises(UserError, match="cifar10 not found under") as e:  # the fact; each command names its option
        load_dataset("cifar10", root=str(tmp_path))
    assert e.value.remedy == "download"
    assert calls == []
    # with the switch, torchvision's real download path is taken (network call stubbed out)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: bool(calls))  # md5 of the real files
    monkeypatch.setattr(
        tvd.cifar, "download_and_extract_archive", lambda url, root, **k: (calls.append(url), _fake_cifar10(tmp_path))
    )
    ds = load_dataset("cifar10:test", root=str(tmp_path), download=True)
    assert calls and "cifar-10-python.tar.gz" in calls[0]
    assert len(ds) == 4 and ds.images.shape == (4, 32, 32, 3) and ds.classes[1] == "c1"


def test_array_loader_shards_cover_dataset(cifar_val):
    ds = load_dataset(f"{cifar_val}[:100]")
    ld = make_loader(ds, 32, train=True, seed=1)
    assert len(ld) == 3  # drop_last
    ld.set_epoch(0)
    a = torch.cat([b["index"] for b in ld])
    ld.set_epoch(1)
    b = torch.cat([b["index"] for b in ld])
    assert len(set(a.tolist())) == 96 and not torch.equal(a, b)
    with pytest.raises(UserError, match="larger than the dataset"):
        make_loader(ds, 128, train=True)


def test_crop_sampler_respects_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    boxes = sample_resized_crops(5000, 32, 32, (0.2, 1.0), gen=g)
    top, left, h, w = boxes.unbind(1)
    area = h * w / 1024
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert area.min() >= 0.2 - 0.05 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 0.1 and ratio.max() <= 4 / 3 + 0.1


def test_resized_crop_flip_exact_on_identity_and_half():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    out = resized_crop_flip(x, torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4]]), 4, torch.tensor([False, True]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))
    # crop the top-left 2x2 block and keep it at 2x2: exact pixels
    out = resized_crop_flip(x[:1], torch.tensor([[0, 0, 2, 2]]), 2, torch.tensor([False]))
    assert torch.allclose(out[0], x[0, :, :2, :2])


def test_hue_matches_torchvision():
    import torchvision.transforms.functional as TF

    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 8)
    f = torch.tensor([0.1, -0.05, 0.0])
    ours = adjust_hue(x.clone(), f)
    ref = torch.stack([TF.adjust_hue(x[i], float(f[i])) for i in range(3)])
    assert torch.allclose(ours, ref, atol=1e-5)


def test_blur_preserves_constant_and_mean():
    x = torch.full((2, 3, 16, 16), 0.5)
    y = gaussian_blur(x, torch.tensor([0.5, 2.0]), 2.0)
    assert torch.allclose(y, x, atol=1e-6)


def test_batch_augment_shapes_and_statistics(cifar_val):
    ds = load_dataset(f"{cifar_val}[:64]")
    imgs = torch.from_numpy(ds.images).permute(0, 3, 1, 2).contiguous()
    cfg = DataConfig(image_size=24, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    g = torch.Generator().manual_seed(0)
    v = BatchAugment(cfg)(imgs, g)
    assert v.shape == (64, 3, 24, 24) and v.min() >= 0 and v.max() <= 1
    gray = (v[:, 0] == v[:, 1]).flatten(1).all(1) & (v[:, 1] == v[:, 2]).flatten(1).all(1)
    assert 0 < gray.sum() < 40  # ~20% grayscale
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(BatchAugment(cfg)(imgs, g1), BatchAugment(cfg)(imgs, g2))  # seeded: reproducible


def _png_folder(root, n=6, size=20):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            rng = np.random.default_rng(hash((c, i)) % 2**32)
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _epoch_batches(ld, epoch):
    ld.set_epoch(epoch)
    return [(b["index"], b["images"][0], b["images"][1]) for b in ld]


def test_file_loader_crops_are_a_function_of_seed_epoch_and_index(tmp_path):
    """Resume exactness for file datasets: a fresh loader (a resumed run) started at epoch 1 gives the same
    crops as one that went through epoch 0, with 0 or 2 workers."""
    ds = load_dataset(str(_png_folder(tmp_path / "f")))
    kw = dict(train=True, seed=7, mode="two_view", image_size=16)
    two = make_loader(ds, 4, workers=2, **kw)
    e0, e1 = _epoch_batches(two, 0), _epoch_batches(two, 1)
    fresh = _epoch_batches(make_loader(ds, 4, workers=0, **kw), 1)
    for (i, a, b), (j, c, d) in zip(e1, fresh):
        assert torch.equal(i, j) and torch.equal(a, c) and torch.equal(b, d)
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(e0, e1))  # another epoch, other crops
    assert not torch.equal(e0[0][1], e0[0][2])  # the two views differ
    other_seed = _epoch_batches(make_loader(ds, 4, workers=0, **{**kw, "seed": 8}), 1)
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(e1, other_seed))


def test_unreadable_image_in_a_worker_is_one_line_naming_the_file(tmp_path):
    root = _png_folder(tmp_path / "f")
    (root / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00truncated")
    ds = load_dataset(str(root))
    with pytest.raises(UserError) as e:
        list(make_loader(ds, 4, train=False, workers=2, image_size=16))
    msg = str(e.value)
    assert "3.png" in msg and "\n" not in msg and "Traceback" not in msg and "worker" not in msg


@pytest.mark.parametrize(
    "labels, classes, needle",
    [
        (np.zeros(6, np.float32), None, "must be integers"),
        (np.zeros((6, 2), np.int64), None, "1-D"),
        (np.zeros(5, np.int64), None, "6 images but 5 labels"),
        (np.array([0, 1, 2, 7, 0, 1]), ["x", "y", "z"], "label 7 out of range"),
        (np.array([0, 1, 2**40, 0, 0, 0]), None, f"label {2**40} out of range"),
        (np.array([0, -5, 1, 0, 0, 0]), None, "label -5 out of range"),
    ],
)
def test_labels_checked_when_loaded(tmp_path, labels, classes, needle):
    p = tmp_path / "bad.npz"
    extra = {"class_names": np.array(classes)} if classes else {}
    np.savez(p, images=np.zeros((6, 8, 8, 3), np.uint8), labels=labels, **extra)
    with pytest.raises(UserError, match=needle) as e:
        load_dataset(str(p))
    assert str(p) in str(e.value)
    ok = np.array([0, -1, 1, 2, 0, 1])  # -1 = unlabelled
    np.savez(p, images=np.zeros((6, 8, 8, 3), np.uint8), labels=ok, class_names=np.array(["x", "y", "z"]))
    assert load_dataset(str(p)).labels.tolist() == ok.tolist()


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_slice_reads_the_slice(tmp_path, compressed):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (50, 8, 8, 3), dtype=np.uint8)
    p = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(p, images=images, labels=np.arange(50) % 5)
    for sl, want in (("[10:20]", np.s_[10:20]), ("[-5:]", np.s_[-5:]), ("[:3]", np.s_[:3]), ("[45:60]", np.s_[45:60])):
        ds = load_dataset(f"{p}{sl}")
        assert np.array_equal(ds.images, images[want]) and ds.labels.tolist() == (np.arange(50) % 5)[want].tolist()
        assert ds.ids == list(range(50))[want]


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit grayscale PNG: PIL's convert("RGB") clips every value above 255 to white."""
    folder = tmp_path / "f" / "a"
    folder.mkdir(parents=True)
    values = np.array([[0, 257, 32896], [65535, 12850, 1000]], dtype=np.uint16)  # 0, 1, 128, 255, 50, 3.9 in 8 bits
    Image.fromarray(values).save(folder / "x.png")
    with Image.open(folder / "x.png") as im:
        assert im.mode.startswith("I")  # what Pillow decodes a 16-bit PNG to
    ds = load_dataset(str(tmp_path / "f"))
    got = np.asarray(ds.load_pil(0))
    assert got.shape == (2, 3, 3) and (got == got[..., :1]).all()
    assert got[..., 0].tolist() == [[0, 1, 128], [255, 50, 4]]
    Image.fromarray(np.full((4, 4, 3), 77, np.uint8)).save(folder / "y.png")  # 8-bit RGB unchanged
    assert (np.asarray(load_dataset(str(tmp_path / "f")).load_pil(1)) == 77).all()


@pytest.mark.parametrize("shape", [(4, 0, 0, 3), (4, 8, 0, 3), (4, 0, 8, 3)])
def test_npz_images_of_size_zero_are_refused(tmp_path, shape):
    p = tmp_path / "empty_images.npz"
    np.savez(p, images=np.zeros(shape, np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(UserError, match=r"empty_images\.npz: 'images' are \d+x\d+ pixels; an image needs at least 1x1"):
        load_dataset(str(p))
    with pytest.raises(UserError, match="at least 1x1"):
        load_dataset(f"{p}[:2]")


def test_dataset_path_linked_to_a_device_is_refused(tmp_path):
    (tmp_path / "zero.npz").symlink_to("/dev/zero")
    with pytest.raises(UserError, match=r"zero\.npz \(dataset\): a character device, not a regular file"):
        load_dataset(str(tmp_path / "zero.npz"))
