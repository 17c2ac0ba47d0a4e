"""Pack what ``benchmarks/gpu_check.py`` needs into ignored folders of the tree, for a GPU machine that has
its own Python and torch but no network and no ``../shared``.

    python benchmarks/gpu_prepare.py            # writes .gpu/ and .whl/ (both git-ignored)

* ``.gpu/cifar10_jpeg.npz``: CIFAR-10 (JPEG copy) from ``../shared/data/cifar10`` (45k train, 5k val)
  as one JPEG per image (quality 75, 4:2:0: the settings the copy was made with, so re-encoding it
  changes pixels by 0.15/255 on average; measured and stored in the file), 44 MB instead of 120 MB,
  so that the tree stays under the 64 MiB a device call carries. ``gpu_check.py`` decodes it with PIL.
* ``.gpu/coco128_det/``: the coco128 detection set (5.5 MB) for the detection engine and the
  ImageNet-recipe file pipeline.
* ``.whl/``: the project's own wheel (pure Python, built from this tree: ``simsiam_kit`` with its
  ``evaluation`` and ``export`` subpackages and the configs), and wheels for Python 3.12 that the GPU image
  lacks: lightly 1.6.0 (the peer) with hydra-core, omegaconf, antlr4 (built locally: its 4.9.3 release is an
  sdist) and pycocotools.

Add both folders to ``.git/info/exclude`` (done here) and name them in the device call's ``carry``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / ".gpu"
WHL = REPO / ".whl"
WHEELS = ["lightly==1.6.0", "hydra-core==1.3.8", "omegaconf==2.3.1"]
WHEELS_BINARY = ["pycocotools==2.0.11"]


def encode_cifar(quality: int = 75) -> dict:
    from PIL import Image

    out, stats = {}, {}
    for split in ("train", "val"):
        with np.load(SHARED / "cifar10" / f"{split}.npz") as d:
            images, labels, names = d["images"], d["labels"], d["class_names"]
        blobs, err = [], 0.0
        for im in images:
            b = io.BytesIO()
            Image.fromarray(im).save(b, "JPEG", quality=quality, subsampling=2)
            blobs.append(np.frombuffer(b.getvalue(), np.uint8))
            back = np.asarray(Image.open(io.BytesIO(b.getvalue())).convert("RGB"), dtype=np.int16)
            err += float(np.abs(back - im).mean())
        offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        out[f"{split}_jpeg"] = np.concatenate(blobs)
        out[f"{split}_offsets"] = offsets
        out[f"{split}_labels"] = labels
        out["class_names"] = names
        stats[split] = {"images": len(images), "bytes": int(offsets[-1]), "mean_abs_pixel_change": err / len(images)}
        print(
            f"{split}: {len(images)} images, {offsets[-1] / 2**20:.1f} MiB, "
            f"mean |re-encoded - original| = {err / len(images):.3f} / 255"
        )
    out["quality"] = np.array(quality)
    out["mean_abs_pixel_change"] = np.array(
        [stats["train"]["mean_abs_pixel_change"], stats["val"]["mean_abs_pixel_change"]]
    )
    OUT.mkdir(exist_ok=True)
    np.savez(OUT / "cifar10_jpeg.npz", **out)
    return stats


def exclude(*names: str) -> None:
    ex = REPO / ".git" / "info" / "exclude"
    lines = ex.read_text().splitlines() if ex.is_file() else []
    for n in names:
        if n not in lines:
            lines.append(n)
    ex.write_text("\n".join(lines) + "\n")


def wheels() -> None:
    WHL.mkdir(exist_ok=True)
    plat = [
        "--platform",
        "manylinux_2_28_x86_64",
        "--platform",
        "manylinux_2_17_x86_64",
        "--platform",
        "manylinux2014_x86_64",
    ]
    base = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *plat,
        "-d",
        str(WHL),
    ]
    subprocess.run(base + ["--platform", "any"] + WHEELS, check=True)
    subprocess.run(base + WHEELS_BINARY, check=True)
    # antlr4-python3-runtime 4.9.3 (omegaconf's pin) is published as an sdist only: build its pure-Python wheel
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(WHL), "antlr4-python3-runtime==4.9.3"],
        check=True,
    )
    for old in WHL.glob("simsiam_kit-*.whl"):  # the project itself, rebuilt from the tree every time
        old.unlink()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(WHL), str(REPO)],
        check=True,
    )


def main():
    exclude("/.gpu/", "/.whl/")
    if not (OUT / "cifar10_jpeg.npz").is_file():
        encode_cifar()
    dst = OUT / "coco128_det"
    if not dst.is_dir():
        shutil.copytree(SHARED / "coco128_det", dst)
    wheels()
    total = sum(p.stat().st_size for d in (OUT, WHL) for p in d.rglob("*") if p.is_file())
    print(f".gpu + .whl: {total / 2**20:.1f} MiB; carry them: carry=['.gpu', '.whl']")


if __name__ == "__main__":
    main()
