"""Embedding throughput: onnxruntime (CPU) vs PyTorch eager, same encoder, same input batch.

    python benchmarks/embed_throughput.py [--reps 3] [--out benchmarks/results/embed_throughput.json]

Cases (one run): ResNet-50 and ResNet-18 (ImageNet stem) at 224 px, and ResNet-18 with the CIFAR stem
at 32 px; batch 64 for all. Each encoder is exported with :func:`export.onnx.export_onnx` (which runs
its own parity check); the benchmark adds the parity figures on the timed batch itself.

* PyTorch eager baseline: fp32, ``model.eval()`` under ``torch.no_grad()``, default settings (default
  thread count, NCHW contiguous memory, no ``torch.compile``, no channels_last, no autocast).
* onnxruntime: the exported fp32 model, default session options (``ORT_ENABLE_ALL`` graph
  optimisations, default intra-op threads), CPUExecutionProvider.

Both time only the encoder on an already normalised float32 (64, 3, S, S) batch. Repetitions of the two
alternate (torch, ort, torch, ort, ...) so that load from other processes hits both alike; one warm-up
call each is not timed. Figures are medians. Target: onnxruntime >= 1.5x PyTorch eager.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simsiam_kit.engine.checkpoint import save_backbone  # noqa: E402
from simsiam_kit.export.embedder import OnnxEmbedder, preprocess  # noqa: E402
from simsiam_kit.export.onnx import export_onnx  # noqa: E402
from simsiam_kit.models import build_backbone  # noqa: E402
from simsiam_kit.utils.io import atomic_write_json  # noqa: E402

CASES = [  # (arch, stem, image size, batch, timed repetitions)
    ("resnet50", "imagenet", 224, 64, 3),
    ("resnet18", "imagenet", 224, 64, 3),
    ("resnet18", "cifar", 32, 64, 10),
]
TARGET = 1.5


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_case(arch, stem, size, batch, reps, tmp: Path) -> dict:
    torch.manual_seed(0)
    model = build_backbone(arch, stem, zero_init_residual=False)
    with torch.no_grad():  # non-default BN statistics, so the parity check is not trivially easy
        model.train()
        model(torch.randn(4, 3, size, size))
    model.eval()
    wpath = tmp / f"{arch}_{stem}.pt"
    save_backbone(wpath, model, arch, stem, {"image_size": size})
    t0 = time.perf_counter()
    rep = export_onnx(str(wpath), tmp / f"{arch}_{stem}_{size}.onnx", parity_data=None)
    export_s = time.perf_counter() - t0
    emb = OnnxEmbedder(tmp / f"{arch}_{stem}_{size}.onnx", normalize=False, device="cpu")

    imgs = np.random.default_rng(0).integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    x = preprocess(imgs, size, emb.mean, emb.std)
    xt = torch.from_numpy(x)

    def torch_fwd():
        with torch.no_grad():
            return model(xt)

    def ort_fwd():
        return emb.run(x)

    ref, got = torch_fwd().numpy(), ort_fwd()  # warm-up + parity on the timed batch
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    t_torch, t_ort = [], []
    for _ in range(reps):
        t_torch.append(_time(torch_fwd))
        t_ort.append(_time(ort_fwd))
    mt, mo = statistics.median(t_torch), statistics.median(t_ort)
    return {
        "arch": arch,
        "stem": stem,
        "image_size": size,
        "batch": batch,
        "reps": reps,
        "torch_eager_images_per_s": batch / mt,
        "onnxruntime_images_per_s": batch / mo,
        "speedup_ort_vs_eager": mt / mo,
        "torch_seconds": t_torch,
        "onnxruntime_seconds": t_ort,
        "parity_timed_batch": {"max_abs_diff": float(np.abs(ref - got).max()), "min_cosine": float(cos.min())},
        "parity_export_check": {k: rep["parity"][k] for k in ("criterion", "passed", "max_abs_diff", "min_cosine")},
        "provider": emb.provider,
        "export_seconds": round(export_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--reps", type=int, default=None, help="timed repetitions per case (default 3 at 224 px, 10 at 32 px)"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "embed_throughput.json"))
    args = ap.parse_args()
    import onnxruntime as ort

    env = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "load_average_before": os.getloadavg(),
    }
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for arch, stem, size, batch, reps in CASES:
            r = run_case(arch, stem, size, batch, args.reps or reps, Path(d))
            rows.append(r)
            print(f"  done {arch} {stem} {size}px: {r['speedup_ort_vs_eager']:.2f}x", flush=True)
    env["load_average_after"] = os.getloadavg()
    print()
    print("PyTorch eager (fp32, default settings) vs onnxruntime CPU, batch 64, medians")
    print(f"{'encoder':<28} {'eager img/s':>11} {'ort img/s':>10} {'ort/eager':>9} {'max|diff|':>10} {'min cos':>9}")
    for r in rows:
        name = f"{r['arch']} {r['stem']} {r['image_size']}px"
        print(
            f"{name:<28} {r['torch_eager_images_per_s']:>11.1f} {r['onnxruntime_images_per_s']:>10.1f} "
            f"{r['speedup_ort_vs_eager']:>8.2f}x {r['parity_timed_batch']['max_abs_diff']:>10.2e} "
            f"{r['parity_timed_batch']['min_cosine']:>9.6f}"
        )
    met = all(r["speedup_ort_vs_eager"] >= TARGET for r in rows)
    print(
        f"target onnxruntime >= {TARGET}x eager: {'met' if met else 'NOT met'} "
        f"(load average before/after {env['load_average_before'][0]:.1f}/{env['load_average_after'][0]:.1f} "
        f"on {env['cores']} cores)"
    )
    atomic_write_json(
        Path(args.out),
        {
            "benchmark": "embed_throughput",
            "baseline": "PyTorch eager fp32, default settings",
            "target_speedup": TARGET,
            "target_met": met,
            "env": env,
            "results": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
