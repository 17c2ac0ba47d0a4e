"""kNN evaluation speed vs lightly, and the linear probe: full protocol vs ``--cached-features``.

    python benchmarks/knn_eval.py [--reps 5] [--features cifar|synthetic] [--linear-train 2000]
                                  [--linear-epochs 5] [--skip-linear] [--out benchmarks/results/knn_eval.json]

Part 1, kNN: 5,000 queries against a 45,000 x 512 bank (the CIFAR-10 split sizes here), k=200,
T=0.1, 10 classes. Features (default ``cifar``): a randomly initialised ResNet-18 (ImageNet stem, seed 0)
applied to the real CIFAR-10 images of ``../shared/data/cifar10`` (train.npz 45,000 as the bank,
val.npz 5,000 as queries), l2-normalised; cached under ``~/.cache/simsiam-kit/bench``.
``--features synthetic`` uses clustered Gaussian vectors instead.

* ours: :func:`evaluation.knn.classify` (what ``simsiam-kit eval knn`` runs after feature extraction:
  index build, one search of depth 200, weighted votes, top-1/top-5, recall@1/5/10, mAP@R) with
  ``--backend auto`` (and, to back the ``auto`` rule, with ``torch`` and ``faiss`` forced).
* peer: ``lightly.utils.benchmarking.knn_predict`` (lightly 1.6.0), called per 1,000-query batch
  against the (D, N) bank, as lightly's ``KNNClassifier`` does per validation batch; the transposed
  bank is built once outside the timing.

* floors: the bare similarity GEMM (fp32, and bf16 for reference) chunked as lightly's, without top-k or
  votes. lightly's time over the fp32 GEMM's is the largest speed-up an exact fp32 search can reach.

Repetitions alternate (ours, lightly, ...) so load from other processes hits both alike; one warm-up
call each is not timed; figures are medians. Checks: same top-1 to 0.1 points. Target: ours >= 2x
faster than lightly.

Part 2, linear probe on a CIFAR-10 subset (``--linear-train`` images of train.npz, 1,000 of val.npz as
the test set): the full protocol (random crops + flips through the frozen backbone every epoch) vs
``--cached-features`` (features extracted once), same epochs / batch / lr; wall time and top-1.
Backbone: random-init ResNet-18 with the CIFAR stem (``--weights`` to use a trained one).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

from _common import cpu_record  # noqa: E402

from simsiam_kit.evaluation.knn import classify  # noqa: E402
from simsiam_kit.retrieval.index import EmbeddingIndex  # noqa: E402
from simsiam_kit.utils.io import atomic_write_json  # noqa: E402
from simsiam_kit.weights import is_random  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10"
CACHE = Path(os.environ.get("SIMSIAM_KIT_CACHE", "~/.cache/simsiam-kit")).expanduser() / "bench"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
TARGET = 2.0
APPROX_RECALL = 0.99  # the approximate searches' target: >= TARGET x lightly at this recall@k, top-1 within 0.1


def cifar_features(backbone: str = "random"):
    """Features of train.npz and val.npz, cached: a random-init ResNet-18 (ImageNet stem, seed 0), or the
    trained backbone file ``backbone`` (cached under its sha256)."""
    if backbone == "random":
        path = CACHE / "cifar10_resnet18_random_imagenetstem_seed0.npz"
    else:
        import hashlib

        sha = hashlib.sha256(Path(backbone).read_bytes()).hexdigest()[:16]
        path = CACHE / f"cifar10_trained_{sha}.npz"
    if path.is_file():
        with np.load(path) as d:
            return (
                torch.from_numpy(d["fb"]),
                torch.from_numpy(d["lb"]),
                torch.from_numpy(d["fq"]),
                torch.from_numpy(d["lq"]),
                d["extract_s"].item(),
            )
    from simsiam_kit.data import load_dataset
    from simsiam_kit.features import extract_features
    from simsiam_kit.utils.device import resolve_device, resolve_precision
    from simsiam_kit.weights import load_backbone

    dev = resolve_device("auto")
    prec = resolve_precision("auto", dev)
    if backbone == "random":
        bb = load_backbone("random", "resnet18", "imagenet", seed=0).model.to(dev)
    else:
        bb = load_backbone(backbone).model.to(dev)
    t = time.perf_counter()
    kw = dict(device=dev, batch_size=512, precision=prec, mean=CIFAR_MEAN, std=CIFAR_STD, workers=0)
    fb, lb, _ = extract_features(bb, load_dataset(str(DATA / "train.npz")), **kw)
    fq, lq, _ = extract_features(bb, load_dataset(str(DATA / "val.npz")), **kw)
    extract_s = time.perf_counter() - t
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, fb=fb.numpy(), lb=lb.numpy(), fq=fq.numpy(), lq=lq.numpy(), extract_s=extract_s)
    return fb, lb, fq, lq, extract_s


def synthetic_features(n=45000, q=5000, d=512, c=10):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(c, d, generator=g)
    lb, lq = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (q,), generator=g)
    fb = torch.nn.functional.normalize(centres[lb] * 0.15 + torch.randn(n, d, generator=g) / d**0.5, dim=1)
    fq = torch.nn.functional.normalize(centres[lq] * 0.15 + torch.randn(q, d, generator=g) / d**0.5, dim=1)
    return fb, lb, fq, lq, 0.0


#: the approximate searches measured next to the exact one: (name, index kind, setting)
APPROX = (
    ("bf16_rerank0", "bf16", {"rerank": 0}),
    ("bf16_rerank16", "bf16", {"rerank": 16}),  # the default
    ("bf16_rerank32", "bf16", {"rerank": 32}),
    ("bf16_rerank200", "bf16", {"rerank": 200}),  # rerank >= k: every candidate re-scored, fp32 similarities
    ("faiss_ivf_nprobe16", "ivf", {"nprobe": 16}),
    ("faiss_ivf_nprobe64", "ivf", {"nprobe": 64}),
)


def bench_knn(fb, lb, fq, lq, reps: int, k=200, t=0.1, c=10, lightly_batch=1000, approx=APPROX) -> dict:
    from lightly.utils.benchmarking import knn_predict

    bank_t = fb.t().contiguous()  # lightly's layout, built once (its KNNClassifier keeps the bank)

    def lightly_run():
        preds = [
            knn_predict(fq[s : s + lightly_batch], bank_t, lb, c, k, t)[:, 0] for s in range(0, len(fq), lightly_batch)
        ]
        return 100.0 * (torch.cat(preds) == lq).float().mean().item()

    def ours(backend):
        def run():
            return classify(fb, lb, fq, lq, ks=(k,), temperature=t, num_classes=c, backend=backend)["per_k"][k]["top1"]

        return run

    found = {}  # name -> (Q, k) neighbour ids of the last call, for recall against the exact search

    def approximate(name, kind, setting):
        from simsiam_kit.retrieval.knn import weighted_vote

        def run():  # what classify does (index build + search + votes), with the index settings given
            index = EmbeddingIndex(fb.shape[1], kind, "auto", **setting).add(fb)
            sims, ids = index.search(fq, k)
            scores = weighted_vote(sims, lb[ids], c, t)
            found[name] = ids
            return 100.0 * (scores.argmax(1) == lq).float().mean().item()

        return run

    def gemm(dtype):  # the bare similarity GEMM, chunked as lightly does: a floor for any exact fp32 search
        q, b = fq.to(dtype), bank_t.to(dtype)

        def run():
            for s in range(0, len(q), lightly_batch):
                q[s : s + lightly_batch] @ b

        return run

    runners = {
        "ours_auto": ours("auto"),
        "lightly": lightly_run,
        "ours_torch": ours("torch"),
        "ours_faiss": ours("faiss"),
        "gemm_fp32": gemm(torch.float32),
        "gemm_bf16": gemm(torch.bfloat16),
        **{name: approximate(name, kind, setting) for name, kind, setting in approx},
    }
    _, exact_ids = EmbeddingIndex(fb.shape[1], "flat", "torch").add(fb).search(fq, k)
    auto_backend = classify(fb[:300], lb[:300], fq[:5], lq[:5], ks=(1,), backend="auto")["backend"]
    times = {name: [] for name in runners}
    top1 = {name: fn() for name, fn in runners.items()}  # warm-up, not timed
    top1 = {name: v for name, v in top1.items() if v is not None}
    for _ in range(reps):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    approx_rows = {}
    for name, kind, setting in approx:
        hit = (found[name].unsqueeze(2) == exact_ids.unsqueeze(1)).any(2).float().mean(1)
        approx_rows[name] = {
            "kind": kind,
            **setting,
            "median_s": med[name],
            "speedup_vs_lightly": med["lightly"] / med[name],
            "recall_at_k": float(hit.mean()),
            "min_recall_at_k": float(hit.min()),
            "top1": top1[name],
            "top1_diff_vs_exact": top1[name] - top1["ours_torch"],
            "meets_target": med["lightly"] / med[name] >= TARGET
            and float(hit.mean()) >= APPROX_RECALL
            and abs(top1[name] - top1["ours_torch"]) <= 0.1,
        }
    return {
        "approximate": approx_rows,
        "auto_backend": auto_backend,
        "top1": top1,
        "median_s": med,
        "times_s": times,
        "speedup_auto_vs_lightly": med["lightly"] / med["ours_auto"],
        "speedup_torch_vs_faiss": med["ours_faiss"] / med["ours_torch"],
        # lightly's time over the bare fp32 GEMM: the largest speed-up an exact fp32 search can reach here
        "max_exact_fp32_speedup": med["lightly"] / med["gemm_fp32"],
        "gemm_share_of_lightly": med["gemm_fp32"] / med["lightly"],
        "top1_diff_points": abs(top1["ours_auto"] - top1["lightly"]),
        "same_top1_within_0.1": abs(top1["ours_auto"] - top1["lightly"]) <= 0.1,
        "target_speedup": TARGET,
        "meets_target": med["lightly"] / med["ours_auto"] >= TARGET,
    }


def bench_linear(weights: str, n_train: int, epochs: int, batch: int) -> dict:
    from simsiam_kit.evaluation.linear import LinearSettings, run_linear_probe

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cached in (False, True):
            s = LinearSettings(
                weights=weights,
                train_data=f"{DATA / 'train.npz'}[:{n_train}]",
                test_data=f"{DATA / 'val.npz'}[:1000]",
                epochs=epochs,
                cached_features=cached,
                batch_size=batch,
                arch="resnet18" if is_random(weights) else None,
                stem="cifar" if is_random(weights) else None,
                mean=CIFAR_MEAN,
                std=CIFAR_STD,
                plots=False,
                workers=0,
            )
            t0 = time.perf_counter()
            r = run_linear_probe(s, Path(tmp) / ("cached" if cached else "full"), log=lambda m: None)
            wall = time.perf_counter() - t0
            out["cached" if cached else "full"] = {
                "wall_s": wall,
                "top1": r["top1"],
                "top5": r["top5"],
                "timing_s": r["timing_s"],
                "settings": r["settings"],
            }
    out["speedup_cached_vs_full"] = out["full"]["wall_s"] / out["cached"]["wall_s"]
    out["top1_diff_points"] = out["cached"]["top1"] - out["full"]["top1"]
    return out


def missing_requirements(features: str, linear: bool) -> list[str]:
    """What this benchmark needs and does not find, checked before anything slow: one line each."""
    import importlib.util

    out = []
    for module, extra in (("lightly", "bench"), ("faiss", "cpu")):
        if importlib.util.find_spec(module) is None:
            out.append(f"'{module}' is not installed; install it with: pip install -e '.[{extra}]'")
    if (features == "cifar" or linear) and not (DATA / "train.npz").is_file():
        out.append(
            f"{DATA / 'train.npz'} not found (the shared CIFAR-10 copy; --features synthetic --skip-linear "
            "runs without it)"
        )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--features", choices=("cifar", "synthetic"), default="cifar")
    ap.add_argument(
        "--backbone",
        default="random",
        help="with --features cifar: a trained backbone file (e.g. RUN/backbone.pt) instead of the random init",
    )
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--weights", default="random", help="backbone for the linear probe part")
    ap.add_argument("--linear-train", type=int, default=2000)
    ap.add_argument("--linear-epochs", type=int, default=5)
    ap.add_argument("--linear-batch", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "knn_eval.json")
    a = ap.parse_args(argv)
    missing = missing_requirements(a.features, not a.skip_linear)
    if missing:  # before the imports and feature extraction that take tens of seconds
        print(f"error: {missing[0]}", file=sys.stderr)
        raise SystemExit(2)

    load_before = os.getloadavg()  # 1/5/15-minute load: other processes share the cores with both sides
    fb, lb, fq, lq, extract_s = cifar_features(a.backbone) if a.features == "cifar" else synthetic_features()
    print(
        f"bank {tuple(fb.shape)}, queries {tuple(fq.shape)} ({a.features} features"
        + (f", extracted in {extract_s:.0f} s" if extract_s else "")
        + f"); {a.reps} timed reps, medians"
    )
    knn = bench_knn(fb, lb, fq, lq, a.reps)
    m, t1 = knn["median_s"], knn["top1"]
    print(f"\nkNN classification, k=200 T=0.1 ({torch.get_num_threads()} threads)")
    print(f"{'method':34s} {'median s':>9s} {'vs lightly':>10s} {'top-1 %':>8s}")
    names = {
        "ours_auto": f"ours, --backend auto ({knn['auto_backend']})",
        "ours_torch": "ours, --backend torch",
        "ours_faiss": "ours, --backend faiss (IndexFlatIP)",
        "lightly": "lightly knn_predict (1,000/batch)",
    }
    names.update(gemm_fp32="(bare fp32 GEMM, no selection)", gemm_bf16="(bare bf16 GEMM, no selection)")
    for key in ("ours_auto", "ours_torch", "ours_faiss", "lightly", "gemm_fp32", "gemm_bf16"):
        acc = f"{t1[key]:8.2f}" if key in t1 else f"{'-':>8s}"
        print(f"{names[key]:34s} {m[key]:9.3f} {m['lightly'] / m[key]:9.2f}x {acc}")
    print(
        f"\napproximate (opt-in), against the exact search above; target >= {TARGET}x lightly, recall@200 >= "
        f"{APPROX_RECALL}, top-1 within 0.1"
    )
    print(f"{'method':34s} {'median s':>9s} {'vs lightly':>10s} {'top-1 %':>8s} {'recall@200':>10s} {'min':>6s}")
    for name, r in knn["approximate"].items():
        print(
            f"{name:34s} {r['median_s']:9.3f} {r['speedup_vs_lightly']:9.2f}x {r['top1']:8.2f} "
            f"{r['recall_at_k']:10.4f} {r['min_recall_at_k']:6.3f}{'  target met' if r['meets_target'] else ''}"
        )
    print(
        f"the fp32 GEMM alone is {100 * knn['gemm_share_of_lightly']:.0f}% of lightly's time: an exact fp32 search "
        f"can be at most {knn['max_exact_fp32_speedup']:.2f}x faster than lightly on this machine"
    )
    print(
        f"speed-up auto vs lightly: {knn['speedup_auto_vs_lightly']:.2f}x (target {TARGET}x: "
        f"{'met' if knn['meets_target'] else 'NOT met'}); top-1 difference {knn['top1_diff_points']:.3f} points"
    )

    result = {
        "benchmark": "knn_eval",
        "features": a.features if a.features == "synthetic" else f"cifar ({a.backbone})",
        "bank": list(fb.shape),
        "queries": list(fq.shape),
        "knn": knn,
        "machine": {
            **cpu_record(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after_knn": [round(x, 2) for x in os.getloadavg()],
        },
    }
    if not a.skip_linear:
        lin = bench_linear(a.weights, a.linear_train, a.linear_epochs, a.linear_batch)
        print(
            f"\nlinear probe, {a.linear_train} train / 1000 test CIFAR-10 images, {a.linear_epochs} epochs, "
            f"batch {a.linear_batch}, weights {a.weights}"
        )
        print(f"{'protocol':18s} {'wall s':>8s} {'top-1 %':>8s} {'top-5 %':>8s}")
        for key in ("full", "cached"):
            print(f"{key:18s} {lin[key]['wall_s']:8.1f} {lin[key]['top1']:8.2f} {lin[key]['top5']:8.2f}")
        print(
            f"cached features: {lin['speedup_cached_vs_full']:.1f}x faster, top-1 {lin['top1_diff_points']:+.2f} points"
        )
        result["linear"] = lin
    atomic_write_json(a.out, result)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
