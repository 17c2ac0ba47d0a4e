"""Every GPU path of simsiam-kit, measured by one short script (one invocation, a few minutes on an H200).

    python benchmarks/gpu_prepare.py                      # here: packs .gpu/ (CIFAR-10 JPEG copy, coco128) and .whl/
    python benchmarks/gpu_check.py --out DIR [--budget-s 420]   # there: writes DIR/gpu_check.json and a table
    python benchmarks/gpu_check.py --smoke --out /tmp/gc  # the same script end to end at toy size (CPU is fine)

It runs with the machine's own torch and the project installed without dependencies (an editable install
here; there, the wheel ``gpu_prepare.py`` builds into ``.whl/``, installed with ``--no-deps --target``), and
reads only ``.gpu/`` (see ``gpu_prepare.py``; falls back to ``../shared/data``). Sections, in order of
priority; each is skipped, and says so, when the time budget is spent, and the JSON is rewritten after
each one, so a run cut short keeps what it measured:

1. ``pretrain``: the ``cifar10_resnet18`` recipe (ResNet-18 CIFAR stem, batch 512, bf16 autocast +
   channels_last) step by step through the builder ``simsiam-kit pretrain`` uses (``build_pretraining``;
   hooks left out): device-resident data vs host data copied per step, eager vs ``torch.compile``.
   Images/s is the median over windows of steps timed with the GPU queue drained at both ends of each
   window, after warm-up steps. Projected 800-epoch time = 800 x 87
   steps at that rate + 80 kNN-monitor evaluations (the recipe's ``knn_every: 10``) at the measured cost.
   The eager device-resident run also records its loss at every step from the seeded initial weights,
   to compare with the CPU path at equal steps.
2. ``lightly``: lightly 1.6.0's SimSiam example loop (``benchmarks/_lightly_peer.py``: PIL transforms in
   DataLoader workers, one per core) on the same GPU, same backbone, batch 512: as written (fp32) and
   with bf16 autocast + channels_last (the strongest setting its user has). Ratios against row 1.
3. ``epoch``: one real epoch of CIFAR-10 (JPEG copy, 45k) through ``run_pretrain`` (the CLI's code path)
   with the kNN monitor (k=200, T=0.1, bank 45k, queries 5k) at its end: loop images/s, kNN top-1, kNN seconds.
4. ``knn_eval``: ``eval knn`` (``run_knn_eval``) 5k queries x 45k bank on the GPU, wall time.
5. ``imagenet``: the ImageNet recipe's ResNet-50 at 224 px, batch 256: the compute ceiling (random tensors
   on the device), the file pipeline alone (JPEG decode + RandomResizedCrop in N DataLoader workers), GPU
   JPEG decoding alone (``torchvision.io.decode_jpeg(device="cuda")`` + crops on the GPU), and training
   steps fed by the file pipeline. The JPEG folder is made on the spot from coco128's photos (repeated).
6. ``embed``: embedding throughput, torch on the GPU (bf16) vs onnxruntime (every provider it has here).
7. ``detection``: the torchvision engine (Faster R-CNN R50-FPN, ``torchvision_quick``) on coco128, s/iter.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # _lightly_peer; simsiam_kit comes from the installed package

import torch  # noqa: E402

EPOCHS, KNN_EVERY = 800, 10  # the cifar10_resnet18 recipe
TRAIN_N = 45000


class Report:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.t0, self.budget = out, time.time(), budget_s
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
        self.rows: list[tuple] = []
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def run(self, name: str, fn, need_s: float, *a, **kw):
        """Run one section if at least ``need_s`` seconds of the budget are left; record result or error."""
        if self.left() < need_s:
            self.data["sections"][name] = {"skipped": f"budget: {self.left():.0f}s left, needs ~{need_s:.0f}s"}
            print(f"[{name}] skipped ({self.left():.0f}s left)", flush=True)
            self.save()
            return None
        t = time.time()
        print(f"[{name}] start ({self.left():.0f}s of budget left)", flush=True)
        try:
            res = fn(*a, **kw)
        except Exception as e:  # one failing path must not hide the others
            res = {"error": f"{type(e).__name__}: {str(e)[:500]}", "traceback": traceback.format_exc()[-3000:]}
            print(f"[{name}] FAILED: {res['error']}", flush=True)
        if isinstance(res, dict):
            res["section_s"] = round(time.time() - t, 1)
        self.data["sections"][name] = res
        print(f"[{name}] done in {time.time() - t:.0f}s", flush=True)
        self.save()
        return res

    def row(self, *cols) -> None:
        self.rows.append(tuple(cols))

    def save(self) -> None:
        self.data["wall_s"] = round(time.time() - self.t0, 1)
        self.data["load_end"] = list(os.getloadavg())
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.out / "gpu_check.json")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def machine(dev) -> dict:
    from _common import cpu_record  # the CPU model and flags, as in every benchmark JSON

    info = {
        **cpu_record(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "load_start": list(os.getloadavg()),
        "device": str(dev),
    }
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(
            {
                "gpu": p.name,
                "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                "sm_count": p.multi_processor_count,
                "capability": f"{p.major}.{p.minor}",
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
            }
        )
        try:
            q = "name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,utilization.gpu"
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except Exception as e:  # pragma: no cover
            info["nvidia_smi"] = repr(e)
    for mod in ("onnxruntime", "faiss", "lightly", "triton", "torchvision"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
            if mod == "onnxruntime":
                info["onnxruntime_providers"] = m.get_available_providers()
            if mod == "faiss":
                info["faiss_gpus"] = m.get_num_gpus() if hasattr(m, "get_num_gpus") else 0
        except Exception as e:
            info[mod] = f"not available ({type(e).__name__})"
    return info


# --------------------------------------------------------------------------------------------- data
def load_cifar(work: Path, n_train: int, n_val: int) -> dict:
    """Decode .gpu/cifar10_jpeg.npz (or read ../shared/data) into work/{train,val}.npz."""
    src = REPO / ".gpu" / "cifar10_jpeg.npz"
    t = time.time()
    out = {}
    if src.is_file():
        from PIL import Image

        d = np.load(src)

        def dec(split, n):
            blob, off = d[f"{split}_jpeg"], d[f"{split}_offsets"]

            def one(i):
                return np.asarray(Image.open(io.BytesIO(blob[off[i] : off[i + 1]].tobytes())).convert("RGB"))

            with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as ex:
                imgs = np.stack(list(ex.map(one, range(n), chunksize=512)))
            return imgs, d[f"{split}_labels"][:n]

        for split, n in (("train", n_train), ("val", n_val)):
            imgs, labels = dec(split, n)
            np.savez(work / f"{split}.npz", images=imgs, labels=labels, class_names=d["class_names"])
            out[split] = len(imgs)
        out["source"] = (
            f"{src.name} (JPEG q{int(d['quality'])} re-encode of the CIFAR-10 JPEG copy; mean |change| "
            f"{float(d['mean_abs_pixel_change'][0]):.3f}/255)"
        )
    else:
        shared = REPO.parent / "shared" / "data" / "cifar10"
        for split, n in (("train", n_train), ("val", n_val)):
            with np.load(shared / f"{split}.npz") as z:
                np.savez(
                    work / f"{split}.npz", images=z["images"][:n], labels=z["labels"][:n], class_names=z["class_names"]
                )
            out[split] = n
        out["source"] = str(shared)
    out["decode_s"] = round(time.time() - t, 1)
    return out


def coco_dir() -> Path:
    p = REPO / ".gpu" / "coco128_det"
    return p if p.is_dir() else REPO.parent / "shared" / "data" / "coco128_det"


# --------------------------------------------------------------------------------------------- timing
def windows(step, dev, warmup: int, n_windows: int, per_window: int, images_per_step: int) -> dict:
    """Run ``warmup`` steps, then ``n_windows`` windows of ``per_window`` steps, each timed between two
    drains of the GPU queue. Returns median / min / max images/s over windows."""
    for _ in range(warmup):
        step()
    sync(dev)
    rates = []
    for _ in range(n_windows):
        t = time.perf_counter()
        for _ in range(per_window):
            step()
        sync(dev)
        rates.append(per_window * images_per_step / (time.perf_counter() - t))
    return {
        "images_per_s": round(statistics.median(rates), 1),
        "min": round(min(rates), 1),
        "max": round(max(rates), 1),
        "windows": n_windows,
        "steps_per_window": per_window,
        "warmup_steps": warmup,
    }


def cycling(loader):
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


# --------------------------------------------------------------------------------------------- 1. pretrain
def pretrain_variant(
    train_npz: Path,
    dev,
    batch: int,
    resident: bool,
    compiled: bool,
    warmup: int,
    n_windows: int,
    per_window: int,
    record_losses: int = 0,
) -> dict:
    """Steps of exactly what ``simsiam-kit pretrain`` runs (``build_pretraining``), without the hooks."""
    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.pretrain import build_pretraining

    cfg = load_pretrain_config(
        "cifar10_resnet18",
        [
            f"data.train={train_npz}",
            "data.val=null",
            f"optim.batch_size={batch}",
            f"train.device={dev}",
            f"train.compile={str(compiled).lower()}",
            f"data.device_resident={str(resident).lower()}",
        ],
    )
    torch.manual_seed(cfg.train.seed)
    p = build_pretraining(cfg, dev)
    prec, cl, step_fn = p.precision, p.channels_last, p.step
    t_compile = None

    class T:  # the attributes PretrainStep reads from the trainer
        epoch, global_step = 0, 0

    it = cycling(p.data.loader)
    losses = []

    def step():
        out = step_fn(next(it), T)
        T.global_step += 1
        if len(losses) < record_losses:
            losses.append(out["loss"])

    if compiled:  # the first step compiles; time it on its own
        t = time.perf_counter()
        step()
        sync(dev)
        t_compile = round(time.perf_counter() - t, 1)
    res = windows(step, dev, warmup, n_windows, per_window, batch)
    res.update(
        {
            "precision": prec.name,
            "channels_last": cl,
            "device_resident": resident,
            "compile": compiled,
            "first_step_s": t_compile,
            "batch": batch,
        }
    )
    if losses:
        res["loss_per_step"] = [round(float(v), 5) for v in losses]
    if dev.type == "cuda":
        res["max_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(dev)
    return res


def section_pretrain(rep: Report, train_npz: Path, dev, a) -> dict:
    out = {}
    variants = [("eager, data on device", True, False), ("eager, host data + copy", False, False)]
    if not a.no_compile:
        variants.append(("compiled, data on device", True, True))
    for name, resident, compiled in variants:
        if compiled and rep.left() < a.compile_need_s:
            out[name] = {"skipped": f"budget ({rep.left():.0f}s left)"}
            continue
        try:
            out[name] = pretrain_variant(
                train_npz,
                dev,
                a.batch,
                resident,
                compiled,
                a.warmup,
                a.windows,
                a.per_window,
                record_losses=a.curve_steps if (resident and not compiled) else 0,
            )
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}", "traceback": traceback.format_exc()[-2500:]}
        r = out[name]
        print(f"  {name}: {r.get('images_per_s', r.get('error', r.get('skipped')))} img/s", flush=True)
    return out


# --------------------------------------------------------------------------------------------- 2. lightly
def section_lightly(train_npz: Path, dev, a) -> dict:
    from _lightly_peer import lightly_example

    from simsiam_kit.models import build_backbone

    with np.load(train_npz) as z:
        images = z["images"]
    workers = min(16, os.cpu_count() or 1)
    out = {"workers": workers}
    for name, amp in (("lightly example (fp32)", False), ("lightly + bf16 + channels_last", True)):
        torch.manual_seed(0)
        _, dl, step_fn = lightly_example(
            images, build_backbone("resnet18", "cifar"), a.batch, workers, device=dev, amp=amp
        )
        it = iter(cycling(dl))

        def step(it=it, step_fn=step_fn):
            views, _ = next(it)
            step_fn(views)

        try:
            out[name] = windows(step, dev, a.lightly_warmup, a.windows, a.per_window, a.batch)
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        del dl
        print(f"  {name}: {out[name].get('images_per_s', out[name].get('error'))} img/s", flush=True)
    return out


# --------------------------------------------------------------------------------------------- 3. epoch
def knn_monitor_seconds(backbone, bank_npz: Path, query_npz: Path, dev, cfg) -> tuple[float, float]:
    """The pretraining kNN monitor's work (the same calls as ``run_pretrain``'s ``knn_eval``), timed."""
    from simsiam_kit.data import load_dataset
    from simsiam_kit.features import extract_features
    from simsiam_kit.retrieval.knn import knn_classify
    from simsiam_kit.utils.device import resolve_channels_last, resolve_precision

    prec = resolve_precision("auto", dev)
    cl = resolve_channels_last(None, dev, prec)
    bank, q = load_dataset(str(bank_npz)), load_dataset(str(query_npz))
    sync(dev)
    t = time.perf_counter()
    kw = dict(
        device=dev,
        batch_size=512,
        precision=prec,
        mean=cfg.data.mean,
        std=cfg.data.std,
        image_size=32,
        channels_last=cl,
        out_device=dev,
    )
    fb, lb, _ = extract_features(backbone, bank, **kw)
    fq, lq, _ = extract_features(backbone, q, **kw)
    pred, _ = knn_classify(fb, lb, fq, k=200, temperature=0.1, num_classes=10)
    acc = 100.0 * (pred == lq).float().mean().item()
    return time.perf_counter() - t, acc


def section_epoch(work: Path, dev, compiled: bool, a) -> dict:
    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.engine.hooks import read_metrics
    from simsiam_kit.pretrain import run_pretrain
    from simsiam_kit.weights import load_backbone

    run = work / "epoch_run"
    cfg = load_pretrain_config(
        "cifar10_resnet18",
        [
            f"data.train={work / 'train.npz'}",
            f"data.val={work / 'val.npz'}",
            f"optim.batch_size={a.batch}",
            "optim.epochs=1",
            "train.knn_every=1",
            "train.progress=false",
            f"train.compile={str(compiled).lower()}",
            f"train.max_steps_per_epoch={a.epoch_steps}",
        ],
    )
    t = time.time()
    summary = run_pretrain(cfg, output=run, log=lambda s: print("  " + s, flush=True))
    wall = time.time() - t
    recs = read_metrics(run / "metrics.jsonl")
    steps = [r for r in recs if r.get("type") == "step"]
    loaded = load_backbone(str(run))
    bb = loaded.model.to(dev, memory_format=torch.channels_last if dev.type == "cuda" else torch.contiguous_format)
    knn_s, knn_acc = knn_monitor_seconds(bb, work / "train.npz", work / "val.npz", dev, cfg)
    knn_s2, _ = knn_monitor_seconds(
        bb, work / "train.npz", work / "val.npz", dev, cfg
    )  # warm: what each later call costs
    epoch_train_s = summary["train_seconds"]
    # resume on the device: a second epoch from the checkpoint (CUDA generator state, fused SGD state)
    resumed = {}
    try:
        cfg2 = load_pretrain_config(
            "cifar10_resnet18",
            [
                f"data.train={work / 'train.npz'}",
                "data.val=null",
                f"optim.batch_size={a.batch}",
                "optim.epochs=2",
                "train.knn_every=0",
                "train.progress=false",
                "train.plots=false",
                f"train.compile={str(compiled).lower()}",
                f"train.max_steps_per_epoch={a.epoch_steps or 10}",
            ],
        )
        s2 = run_pretrain(cfg2, output=run, resume=True, log=lambda s: print("  " + s, flush=True))
        ep = [r["epoch"] for r in read_metrics(run / "metrics.jsonl") if r.get("type") == "epoch"]
        resumed = {"ok": ep == [1, 2], "epochs_in_metrics": ep, "final_loss": s2.get("final_loss")}
    except Exception as e:
        resumed = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {
        "resume": resumed,
        "summary": summary,
        "wall_s": round(wall, 1),
        "loop_images_per_s": summary.get("images_per_s"),
        "knn_top1": summary.get("knn_top1"),
        "knn_top1_random_init": summary.get("knn_top1_random_init"),
        "knn_monitor_s_first": round(knn_s, 2),
        "knn_monitor_s": round(knn_s2, 2),
        "knn_recomputed_top1": knn_acc,
        "train_seconds_incl_knn_and_checkpoint": epoch_train_s,
        "step_losses": [(r["step"], round(r["loss"], 5)) for r in steps],
    }


# --------------------------------------------------------------------------------------------- 4. eval knn
def section_knn_eval(work: Path, dev) -> dict:
    from simsiam_kit.evaluation.knn import KNNSettings, run_knn_eval

    w = work / "epoch_run"
    weights = str(w) if (w / "backbone.pt").is_file() else "random"
    out = {}
    for rep_i in range(2):  # the second call is warm (cuDNN autotune, CUDA context) like a user's later calls
        s = KNNSettings(
            weights=weights,
            train_data=str(work / "train.npz"),
            test_data=str(work / "val.npz"),
            ks=(20, 200),
            arch="resnet18" if weights == "random" else None,
            stem="cifar" if weights == "random" else None,
            device=str(dev),
            batch_size=512,
            plots=False,
        )
        t = time.time()
        res = run_knn_eval(s, work / f"knn_eval{rep_i}", log=lambda s: None)
        out[f"wall_s_run{rep_i + 1}"] = round(time.time() - t, 2)
    st = res["settings"]
    out.update(
        {
            "weights": weights,
            "backend": st["backend"],
            "device": st["device"],
            "precision": st["precision"],
            "per_k": res["per_k"],
            "timing_s": res["timing_s"],
            "bank": st["bank_size"],
            "queries": st["queries"],
        }
    )
    return out


# --------------------------------------------------------------------------------------------- 5. imagenet
def make_jpeg_folder(root: Path, n: int) -> Path:
    """An ImageFolder of ``n`` real photos (coco128's JPEGs, repeated as files), 2 classes."""
    imgs = sorted((coco_dir() / "images").rglob("*.jpg"))
    if not imgs:
        raise RuntimeError(f"no JPEGs under {coco_dir()}")
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        dst = root / ("a" if i % 2 else "b") / f"{i:06d}.jpg"
        if not dst.exists():
            dst.write_bytes(imgs[i % len(imgs)].read_bytes())
    return root


def gpu_decode_rate(folder: Path, dev, batch: int, size: int, batches: int) -> dict:
    """Feeding rate of GPU JPEG decoding in the main process: file bytes read on the host,
    ``decode_jpeg(list, device='cuda')`` (batched nvJPEG), then two random resized crops + flips per image
    on the GPU (crop boxes drawn on the host: no sync per image; one resize launch per crop)."""
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    from simsiam_kit.data.transforms import sample_resized_crops

    files = sorted(folder.rglob("*.jpg"))
    gen = torch.Generator().manual_seed(0)

    def read(b):
        chunk = [files[(b * batch + i) % len(files)] for i in range(batch)]
        return [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in chunk]

    def crops(imgs):
        views = []
        for _ in range(2):
            out = []
            for im in imgs:
                t, l, h, w = sample_resized_crops(1, im.shape[1], im.shape[2], (0.2, 1.0), gen=gen)[0].long().tolist()
                crop = im[:, t : t + h, l : l + w].unsqueeze(0).float()
                if torch.rand(1, generator=gen).item() < 0.5:
                    crop = crop.flip(-1)
                out.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
            views.append(torch.cat(out).round_().clamp_(0, 255).to(torch.uint8))
        return views

    crops(decode_jpeg(read(0), device=dev, mode=ImageReadMode.RGB))
    sync(dev)
    t_read = t_dec = 0.0
    t = time.perf_counter()
    for b in range(batches):
        t0 = time.perf_counter()
        data = read(b + 1)
        t1 = time.perf_counter()
        imgs = decode_jpeg(data, device=dev, mode=ImageReadMode.RGB)
        sync(dev)
        t2 = time.perf_counter()
        crops(imgs)
        t_read, t_dec = t_read + t1 - t0, t_dec + t2 - t1
    sync(dev)
    total = time.perf_counter() - t
    n = batches * batch
    return {
        "images_per_s": round(n / total, 1),
        "decode_only_images_per_s": round(n / t_dec, 1),
        "file_read_images_per_s": round(n / t_read, 1),
        "batches": batches,
        "note": "one process: host file read + batched nvJPEG decode + per-image crop/resize launches on the GPU",
    }


def section_imagenet(work: Path, dev, a) -> dict:
    from simsiam_kit.config import load_pretrain_config
    from simsiam_kit.data.loaders import make_loader
    from simsiam_kit.losses import simsiam_loss
    from simsiam_kit.pretrain import build_pretraining

    folder = make_jpeg_folder(work / "jpegs", a.r50_files)
    bs, size = a.r50_batch, a.r50_size
    cores = os.cpu_count() or 1
    cfg = load_pretrain_config(
        "imagenet_resnet50",
        [
            f"data.train={folder}",
            "data.val=null",
            f"train.device={dev}",
            f"optim.batch_size={bs}",
            f"data.image_size={size}",
        ],
    )
    torch.manual_seed(0)
    p = build_pretraining(cfg, dev)  # what `simsiam-kit pretrain --config imagenet_resnet50` runs
    prec, cl, model, opt, ds = p.precision, p.channels_last, p.model, p.optimizer, p.data.train
    mf = torch.channels_last if cl else torch.contiguous_format
    out = {
        "batch": bs,
        "image_size": size,
        "files": a.r50_files,
        "precision": prec.name,
        "auto_workers": p.data.workers,
    }

    # (a) compute ceiling: the step on random normalised tensors already on the device
    x1 = torch.randn(bs, 3, size, size, device=dev).contiguous(memory_format=mf)
    x2 = torch.randn(bs, 3, size, size, device=dev).contiguous(memory_format=mf)

    def ceil_step():
        with prec.autocast():
            p1, p2, z1, z2 = model(x1, x2)
            loss = simsiam_loss(p1, p2, z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out["ceiling"] = windows(ceil_step, dev, 2, a.r50_windows, a.r50_per_window, bs)
    print(f"  R50 ceiling: {out['ceiling']['images_per_s']} img/s", flush=True)

    # (b) the file pipeline alone, at several worker counts
    for w in sorted({max(1, cores // 2), cores}):
        loader = make_loader(ds, bs, train=True, mode="two_view", image_size=size, workers=w)
        it = cycling(loader)
        next(it)  # every worker builds whole batches, all starting together: time 2 rounds after the first batch
        t = time.perf_counter()
        nb = a.r50_loader_rounds * w
        for _ in range(nb):
            next(it)
        out[f"file_loader_{w}_workers"] = {"images_per_s": round(nb * bs / (time.perf_counter() - t), 1), "batches": nb}
        print(f"  file loader, {w} workers: {out[f'file_loader_{w}_workers']['images_per_s']} img/s", flush=True)
        del it, loader

    # (c) GPU JPEG decoding
    if dev.type == "cuda":
        try:
            out["gpu_decode"] = gpu_decode_rate(folder, dev, bs, size, a.r50_loader_batches)
            print(f"  GPU decode: {out['gpu_decode']['images_per_s']} img/s", flush=True)
        except Exception as e:
            out["gpu_decode"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}

    # (d) training steps fed by the file pipeline (data.workers auto), as `simsiam-kit pretrain` runs them
    step_fn = p.step

    class T:
        epoch, global_step = 0, 0

    it = cycling(p.data.loader)

    def step():
        step_fn(next(it), T)
        T.global_step += 1

    # warm-up drains the batches the workers prefetched while the model was idle
    out["file_fed_training"] = windows(step, dev, p.data.workers + 2, a.r50_windows, a.r50_per_window, bs)
    out["file_fed_training"]["workers"] = p.data.workers
    print(f"  R50 fed by files: {out['file_fed_training']['images_per_s']} img/s", flush=True)
    if dev.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return out


# --------------------------------------------------------------------------------------------- 6. embed
def section_embed(work: Path, dev, a) -> dict:
    from simsiam_kit.data import load_dataset
    from simsiam_kit.engine.checkpoint import save_backbone
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.export.onnx import export_onnx
    from simsiam_kit.features import extract_features
    from simsiam_kit.models import build_backbone
    from simsiam_kit.utils.device import resolve_channels_last, resolve_precision

    val = load_dataset(str(work / "val.npz"))
    prec = resolve_precision("auto", dev)
    cl = resolve_channels_last(None, dev, prec)
    out = {}
    w = work / "epoch_run"
    weights = str(w) if (w / "backbone.pt").is_file() else None
    if weights is None:
        torch.manual_seed(0)
        save_backbone(
            work / "r18.pt",
            build_backbone("resnet18", "cifar"),
            "resnet18",
            "cifar",
            {"image_size": 32, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]},
        )
        weights = str(work / "r18.pt")
    onnx_path = work / "r18.onnx"
    rep = export_onnx(weights, onnx_path, parity_data=str(work / "val.npz") + "[:16]", device="auto")
    out["export_parity"] = {k: rep.get(k) for k in ("parity", "max_abs_diff", "provider") if k in rep}
    from simsiam_kit.weights import load_backbone

    bb = load_backbone(weights).model.to(dev, memory_format=torch.channels_last if cl else torch.contiguous_format)
    kw = dict(
        device=dev,
        batch_size=512,
        precision=prec,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        image_size=32,
        channels_last=cl,
    )
    extract_features(bb, val, **kw)  # warm-up
    sync(dev)
    t = time.perf_counter()
    for _ in range(3):
        extract_features(bb, val, **kw)
    sync(dev)
    out["torch"] = {
        "images_per_s": round(3 * len(val) / (time.perf_counter() - t), 1),
        "precision": prec.name,
        "batch": 512,
    }
    n = min(len(val), a.ort_images)
    imgs = val.images[:n]
    for device in ("cuda", "cpu"):
        try:
            emb = OnnxEmbedder(onnx_path, device=device, batch_size=512 if device == "cuda" else 64)
        except Exception as e:
            out[f"onnxruntime_{device}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        emb.embed(imgs[:64])
        t = time.perf_counter()
        emb.embed(imgs)
        out[f"onnxruntime_{device}"] = {
            "images_per_s": round(n / (time.perf_counter() - t), 1),
            "provider": emb.provider,
            "images": n,
        }
    return out


# --------------------------------------------------------------------------------------------- 7. detection
def section_detection(work: Path, dev, a) -> dict:
    from simsiam_kit.evaluation.detection.data import resolve_data
    from simsiam_kit.evaluation.detection.torchvision_engine import load_detection_config, run_torchvision_detection

    c = coco_dir()
    data = resolve_data(
        c / "instances_train.json",
        c / "images",
        c / "instances_val.json",
        c / "images",
        None,
        "2007/trainval,2012/trainval",
        "2007/test",
    )
    out = {}
    cfg = load_detection_config(
        "torchvision_quick",
        [
            f"train.device={dev}",
            "train.progress=false",
            f"data.workers={min(8, os.cpu_count() or 1)}",
            "test.vis_images=0",
        ],
    )
    res = run_torchvision_detection(
        cfg, "random", data, work / "det", iters=a.det_iters, arch="resnet50", log=lambda s: print("  " + s, flush=True)
    )
    out["torchvision_quick_r50_fpn"] = {
        k: res.get(k)
        for k in (
            "seconds_per_iter",
            "train_seconds",
            "eval_seconds",
            "AP",
            "AP50",
            "batch_size",
            "min_size",
            "precision",
            "device",
            "iters",
        )
    }
    return out


# --------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting sections after this long")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: proves the script end to end on a CPU")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    a = ap.parse_args(argv)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    sizes = dict(
        n_train=TRAIN_N,
        n_val=5000,
        batch=512,
        warmup=5,
        windows=5,
        per_window=10,
        curve_steps=60,
        lightly_warmup=30,
        compile_need_s=150,
        epoch_steps=0,
        r50_files=2048,
        r50_batch=256,
        r50_size=224,
        r50_windows=3,
        r50_per_window=8,
        r50_loader_batches=8,
        r50_loader_rounds=2,
        ort_images=5000,
        det_iters=30,
    )
    if a.smoke:
        sizes.update(
            n_train=1024,
            n_val=256,
            batch=64,
            warmup=1,
            windows=2,
            per_window=2,
            curve_steps=4,
            lightly_warmup=1,
            compile_need_s=0,
            epoch_steps=4,
            r50_files=32,
            r50_batch=8,
            r50_size=64,
            r50_windows=1,
            r50_per_window=1,
            r50_loader_batches=2,
            r50_loader_rounds=1,
            ort_images=128,
            det_iters=2,
        )
        a.no_compile = True
    for k, v in sizes.items():
        setattr(a, k, v)
    only = set(filter(None, a.only.split(",")))
    rep = Report(Path(a.out), a.budget_s)
    torch.backends.cudnn.benchmark = True
    rep.data["machine"] = machine(dev)
    rep.data["settings"] = {k: v for k, v in vars(a).items()}
    print(json.dumps(rep.data["machine"], indent=1), flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    rep.data["data"] = load_cifar(work, a.n_train, a.n_val)
    print(f"data: {rep.data['data']}", flush=True)

    def want(name):
        return not only or name in only

    pre = rep.run("pretrain", section_pretrain, 30, rep, work / "train.npz", dev, a) if want("pretrain") else None
    if want("lightly"):
        rep.run("lightly", section_lightly, 30, work / "train.npz", dev, a)
    compiled = False
    if pre:
        e = pre.get("eager, data on device", {}).get("images_per_s") or 0
        c = pre.get("compiled, data on device", {}).get("images_per_s") or 0
        compiled = c > 1.05 * e  # compile only where it measures faster (by more than the window spread)
    if want("epoch"):
        rep.run("epoch", section_epoch, 40, work, dev, compiled, a)
    if want("knn_eval"):
        rep.run("knn_eval", section_knn_eval, 20, work, dev)
    if want("imagenet"):
        rep.run("imagenet", section_imagenet, 60, work, dev, a)
    if want("embed"):
        rep.run("embed", section_embed, 30, work, dev, a)
    if want("detection"):
        rep.run("detection", section_detection, 40, work, dev, a)
    summarise(rep, a)
    rep.save()


def summarise(rep: Report, a) -> None:
    s = rep.data["sections"]
    rows = []
    pre = s.get("pretrain") or {}
    epoch = s.get("epoch") or {}
    knn_s = epoch.get("knn_monitor_s")
    steps = TRAIN_N // 512 if not a.smoke else a.n_train // a.batch
    best = None
    for name, r in pre.items():
        if isinstance(r, dict) and r.get("images_per_s"):
            ips = r["images_per_s"]
            proj = EPOCHS * steps * a.batch / ips + (EPOCHS // KNN_EVERY) * (knn_s or 0)
            r["projected_800_epochs_min"] = round(proj / 60, 1)
            rows.append((f"pretrain cifar10_resnet18: {name}", f"{ips:,.0f} img/s", f"800 ep: {proj / 60:.1f} min"))
            if best is None or ips > best[1]:
                best = (name, ips, proj)
    lt = s.get("lightly") or {}
    for name, r in lt.items():
        if isinstance(r, dict) and r.get("images_per_s"):
            ratio = f"ours/peer {best[1] / r['images_per_s']:.2f}x" if best else ""
            proj = EPOCHS * steps * a.batch / r["images_per_s"]
            rows.append((name, f"{r['images_per_s']:,.0f} img/s", f"800 ep: {proj / 60:.1f} min; {ratio}"))
    if epoch.get("loop_images_per_s"):
        rows.append(
            (
                "real epoch via run_pretrain (hooks, kNN excluded)",
                f"{epoch['loop_images_per_s']:,.0f} img/s",
                f"kNN top-1 {epoch.get('knn_top1')} (random init {epoch.get('knn_top1_random_init')})",
            )
        )
        rows.append(
            (
                "kNN monitor (45k bank, 5k queries)",
                f"{knn_s} s per call",
                f"first call {epoch.get('knn_monitor_s_first')} s",
            )
        )
    ke = s.get("knn_eval") or {}
    if ke.get("wall_s_run2") is not None:
        rows.append(("eval knn 5k x 45k (run_knn_eval)", f"{ke['wall_s_run2']} s", f"first call {ke['wall_s_run1']} s"))
    im = s.get("imagenet") or {}
    for k in ("ceiling", "file_fed_training", "gpu_decode"):
        if isinstance(im.get(k), dict) and im[k].get("images_per_s"):
            rows.append((f"R50 {a.r50_size}px b{a.r50_batch}: {k}", f"{im[k]['images_per_s']:,.0f} img/s", ""))
    for k, v in im.items():
        if k.startswith("file_loader_") and isinstance(v, dict):
            rows.append((f"R50 file pipeline alone, {k[12:].replace('_', ' ')}", f"{v['images_per_s']:,.0f} img/s", ""))
    em = s.get("embed") or {}
    for k in ("torch", "onnxruntime_cuda", "onnxruntime_cpu"):
        if isinstance(em.get(k), dict) and em[k].get("images_per_s"):
            rows.append(
                (f"embed R18-CIFAR 32px: {k}", f"{em[k]['images_per_s']:,.0f} img/s", em[k].get("provider", ""))
            )
    det = (s.get("detection") or {}).get("torchvision_quick_r50_fpn") or {}
    if det.get("seconds_per_iter"):
        rows.append(
            (
                "detection torchvision R50-FPN quick",
                f"{det['seconds_per_iter']} s/iter",
                f"batch {det.get('batch_size')}",
            )
        )
    if best:
        rep.data["projected_800_epochs_min"] = round(best[2] / 60, 1)
        rep.data["best_pretrain_setting"] = best[0]
    for name, r in s.items():
        if isinstance(r, dict) and ("error" in r or "skipped" in r):
            rows.append((f"{name}", "-", r.get("error") or r.get("skipped")))
    rep.data["table"] = rows
    w0 = max(len(r[0]) for r in rows) if rows else 10
    w1 = max(len(r[1]) for r in rows) if rows else 10
    print("\n" + "\n".join(f"{r[0]:<{w0}} | {r[1]:>{w1}} | {r[2]}" for r in rows))
    print(
        f"\ndevice: {rep.data['machine'].get('gpu', rep.data['machine']['device'])}; wall {time.time() - rep.t0:.0f}s; "
        f"json: {rep.out / 'gpu_check.json'}"
    )


if __name__ == "__main__":
    main()
