"""kNN evaluation: weighted kNN classification and retrieval metrics from one nearest-neighbour search.

The search and the vote are the core's (:class:`simsiam_kit.retrieval.knn.KNNClassifier`, the same
object as the pretraining kNN monitor's); this module adds what the ``eval knn`` protocol reports on
its neighbours (retrieval metrics, confusion matrix, plots) and the command's settings and outputs.
Where a change goes: a new option in :class:`KNNSettings` and ``simsiam_kit/cli/knn.py``; a new
metric on the neighbours next to :func:`retrieval_metrics`; the vote or the search in
``simsiam_kit/retrieval/``.

Protocol (InstDisc, Wu et al. 2018; DINO ``eval_knn.py``): backbone features (eval mode, no_grad,
batched, AMP on GPU) are l2-normalised; each test image takes its k most similar training images
(cosine similarity s_i) and class c scores ``sum_i exp(s_i / T) [y_i == c]``; the prediction is the
arg-max, equal scores going to the lowest class index. Defaults k=200, T=0.1 (InstDisc); DINO uses
k=20, T=0.07. Several k come from one search of depth max(k, 10): the search returns neighbours
sorted by decreasing similarity (equal similarities by increasing bank index), so the k nearest are
a prefix of the deeper list.

Retrieval metrics on the same search (the test image is the query, the training set the database):

* recall@K: share of queries with at least one neighbour of their own class among the K nearest
  (the metric-learning "Recall@K").
* mAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020): with R the number of training
  images of the query's class, ``AP@R = (1/R) sum_{i<=R} P(i) rel(i)``. Because it comes from the
  same search, R is capped at the search depth (``map_at_r_depth`` in results.json); with the
  default k=200 and CIFAR-10 (4,500 images per class) it is mAP@200.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from simsiam_kit.config import DEFAULT_KNN_K, DEFAULT_KNN_TEMPERATURE, MIN_KNN_TEMPERATURE
from simsiam_kit.errors import UserError, check_number, require_extra
from simsiam_kit.evaluation.protocol import EvalInputs, EvalSettings
from simsiam_kit.retrieval.index import RERANK, check_k
from simsiam_kit.retrieval.knn import KNNClassifier, check_temperatures
from simsiam_kit.utils.io import atomic_savefig

RECALL_KS = (1, 5, 10)
#: queries an approximate search is checked on against the exact one (``approximate`` in results.json)
APPROX_CHECK_QUERIES = 500
#: every peer's kNN protocol from one search: DINO and mmpretrain use T=0.07 with k 10/20/100/200;
#: InstDisc, lightly and solo-learn k=200, T=0.1 (the headline, listed first)
PROTOCOL_KS = (DEFAULT_KNN_K, 10, 20, 100)
PROTOCOL_TEMPERATURES = (DEFAULT_KNN_TEMPERATURE, 0.07)


# ------------------------------------------------------------------------------------------ metrics
def retrieval_metrics(
    neighbour_labels: torch.Tensor,
    query_labels: torch.Tensor,
    class_counts: torch.Tensor,
    recall_ks: Sequence[int] = RECALL_KS,
) -> dict:
    """recall@K and mAP@R (R capped at the search depth) in percent."""
    rel = (neighbour_labels == query_labels.view(-1, 1)).float()  # (Q, depth)
    depth = rel.shape[1]
    out = {}
    for k in recall_ks:
        if k <= depth:
            out[f"recall@{k}"] = 100.0 * rel[:, :k].amax(1).mean().item()
    r = class_counts[query_labels].clamp(max=depth).float()  # (Q,)
    pos = torch.arange(1, depth + 1, dtype=torch.float32).view(1, -1)
    in_r = (pos <= r.view(-1, 1)).float()
    precision_at = rel.cumsum(1) / pos
    ap = (precision_at * rel * in_r).sum(1) / r.clamp(min=1)
    out["map_at_r"] = 100.0 * ap.mean().item()
    return out


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes).numpy()


def classify(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    ks: Sequence[int] = (200,),
    temperature: Union[float, Sequence[float]] = 0.1,
    num_classes: Optional[int] = None,
    backend: str = "auto",
    kind: str = "flat",
    recall_ks: Sequence[int] = RECALL_KS,
    rerank: Optional[int] = None,
    check_queries: int = APPROX_CHECK_QUERIES,
) -> dict:
    """One search (the core's :class:`~simsiam_kit.retrieval.knn.KNNClassifier`), every k x temperature,
    and the retrieval metrics on its neighbours. Features must be l2-normalised float32 (as extracted).
    ``per_k`` is at the first temperature; ``grid`` holds every (k, T).

    An approximate ``kind`` (bf16, ivf, hnsw) is labelled with what it lost: ``approximate`` holds the
    recall of the exact neighbours and the agreement of the predictions with an exact search, measured
    on ``check_queries`` evenly spaced queries (0: not measured)."""
    temps = [float(t) for t in (temperature if isinstance(temperature, (list, tuple)) else (temperature,))]
    n = bank.shape[0]
    if n == 0 or queries.shape[0] == 0:
        raise UserError("kNN needs a non-empty bank and query set")
    ks = sorted(check_k(ks, n, "--k", f"the kNN bank ({n} training images)"))
    num_classes = num_classes or int(max(bank_labels.max(), query_labels.max())) + 1
    t0 = time.perf_counter()
    knn = KNNClassifier(
        ks,
        tuple(temps),
        num_classes,
        backend=backend,
        kind=kind,
        normalize=False,
        min_depth=max(recall_ks),
        rerank=RERANK if rerank is None else rerank,
    )
    out = knn.update(bank, bank_labels).compute(queries, query_labels)
    search_s = time.perf_counter() - t0  # index build + search + votes
    approx = None
    if kind != "flat" and check_queries > 0:
        approx = approximation_check(bank, bank_labels, queries, out, ks, temps, num_classes, check_queries)
        approx.update(kind=kind, rerank=knn.index.rerank if kind == "bf16" else None)
    per_k = {}
    for k in ks:
        acc = out.accuracy[(k, temps[0])]
        per_k[k] = {"top1": acc["top1"], "top5": acc["top5"], "pred": out.pred(k, temps[0])}
    grid = {
        (k, t): {"top1": out.accuracy[(k, t)]["top1"], "top5": out.accuracy[(k, t)]["top5"], "pred": out.pred(k, t)}
        for k in ks
        for t in temps
    }
    counts = torch.bincount(bank_labels.long(), minlength=num_classes)
    retr = retrieval_metrics(out.neighbour_labels, query_labels, counts, recall_ks)
    return {
        "per_k": per_k,
        "grid": grid,
        "retrieval": retr,
        "ids": out.ids,
        "sims": out.sims,
        "depth": out.depth,
        "backend": out.backend,
        "index": knn.index,
        "search_s": search_s,
        "approximate": approx,
    }


def approximation_check(bank, bank_labels, queries, out, ks, temps, num_classes: int, n: int) -> dict:
    """What an approximate search lost, on ``n`` evenly spaced queries: recall@k of the exact neighbours
    (share of the exact k nearest found) and the share of predictions equal to an exact search's, both at
    the largest k (the deepest, most affected cut) and the first temperature."""
    rows = torch.from_numpy(np.unique(np.linspace(0, len(queries) - 1, min(n, len(queries))).round().astype(np.int64)))
    k = max(ks)
    exact = (
        KNNClassifier(k, temps[0], num_classes, backend="torch", kind="flat", normalize=False, device="cpu")
        .update(bank, bank_labels)
        .compute(queries[rows])
    )
    got = out.ids[rows.to(out.ids.device), :k].cpu()
    hit = (got.unsqueeze(2) == exact.ids[:, :k].cpu().unsqueeze(1)).any(2).float().mean(1)
    same = (out.pred(k, temps[0])[rows.to(out.ids.device)].cpu() == exact.pred(k, temps[0]).cpu()).float()
    return {
        "checked_queries": int(len(rows)),
        "recall_at_k": float(hit.mean()),
        "recall_k": int(k),
        "min_recall_at_k": float(hit.min()),
        "same_prediction_pct": 100.0 * float(same.mean()),
        "prediction_temperature": float(temps[0]),
    }


# ------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    plt = _plt()
    c = len(classes)
    size = min(12, 2.5 + 0.45 * c)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    rows = cm.sum(1, keepdims=True).clip(min=1)
    share = 100.0 * cm / rows  # percent of each true class: the colours, the colour bar and the cells agree
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    if c <= 30:
        ax.set_xticks(range(c), [str(x) for x in classes], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(c), [str(x) for x in classes], fontsize=7)
        if c <= 15:
            for i in range(c):
                for j in range(c):
                    if cm[i, j]:
                        ax.text(
                            j,
                            i,
                            f"{share[i, j]:.0f}%",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="white" if share[i, j] > 50 else "black",
                        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the true class", format="%.0f%%")
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def plot_neighbour_grid(
    query_ds,
    query_pos: Sequence[int],
    bank_ds,
    neighbour_pos: np.ndarray,
    sims: np.ndarray,
    query_labels: Sequence[int],
    neighbour_labels: np.ndarray,
    classes: Sequence[str],
    path: Path,
) -> Path:
    """One row per query: the query image, then its nearest training images (green frame: same class)."""
    plt = _plt()
    nq, nn_ = neighbour_pos.shape
    fig, axes = plt.subplots(nq, nn_ + 1, figsize=(1.2 * (nn_ + 1), 1.35 * nq), dpi=110, squeeze=False)
    for r in range(nq):
        ax = axes[r, 0]
        ax.imshow(query_ds.load_pil(int(query_pos[r])))
        ax.set_title(f"query: {classes[int(query_labels[r])]}"[:18], fontsize=6)
        for c in range(nn_):
            ax = axes[r, c + 1]
            img = bank_ds.load_pil(int(neighbour_pos[r, c]))
            if img is not None:
                ax.imshow(img)
            same = int(neighbour_labels[r, c]) == int(query_labels[r])
            for sp in ax.spines.values():
                sp.set_edgecolor("tab:green" if same else "tab:red")
                sp.set_linewidth(2)
            ax.set_title(f"{sims[r, c]:.3f}", fontsize=6)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].spines["left"].set_linewidth(0)
    fig.tight_layout(pad=0.3)
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ command
@dataclass(frozen=True)
class KNNSettings(EvalSettings):
    # None = the protocol grid (PROTOCOL_KS within the bank size x PROTOCOL_TEMPERATURES); the first k and
    # the first temperature make the headline number
    ks: Optional[tuple] = None
    temperatures: Optional[tuple] = None
    backend: str = "auto"
    index: str = "flat"
    rerank: Optional[int] = None  # --index bf16: 2 x rerank candidates at the cut re-scored in fp32 (default RERANK)
    save_index: bool = False
    tensorboard: Optional[bool] = None  # OUTPUT/tensorboard (the results' scalars); None = when installed
    grid_queries: int = 8
    grid_neighbours: int = 8


def _choose_ks(asked: Optional[Sequence[int]], bank: int, what: str, default: Optional[Sequence[int]] = None) -> tuple:
    """The k to score: the asked ones (each at most the bank size), else the protocol's that fit the bank
    (the bank size itself when none does)."""
    if asked:
        check_k(asked, bank, "--k", f"the kNN bank ({bank}{what})")
        return tuple(int(k) for k in asked)
    fit = tuple(k for k in (default or PROTOCOL_KS) if k <= bank)
    return fit or (bank,)


def run_knn_eval(s: KNNSettings, output: Path, log: Callable[[str], None] = print) -> dict:
    """Extract features, search, classify; write features, results.json and plots under ``output``.

    An output directory that holds an earlier evaluation's results is refused unless ``s.overwrite``."""
    return KNNProtocol(s).run(output, log)


class KNNProtocol:
    """The kNN protocol: options checked once (:meth:`validate`), :meth:`run` on the shared inputs to the
    results.json record, :meth:`write` of its own files (features, confusion matrix, plots, results)."""

    name = "knn"

    def __init__(self, settings: KNNSettings):
        self.s = settings
        self.temps = tuple(float(t) for t in (settings.temperatures or PROTOCOL_TEMPERATURES))
        self.validate()

    def validate(self) -> None:
        from simsiam_kit.retrieval.index import BACKENDS, KIND_BACKEND, KINDS

        s = self.s
        if s.backend not in BACKENDS:
            raise UserError(f"unknown --backend '{s.backend}' (available: {', '.join(BACKENDS)})")
        if s.index not in KINDS and s.index != "auto":
            raise UserError(f"unknown --index '{s.index}' (available: auto, {', '.join(KINDS)})")
        need = KIND_BACKEND.get(s.index)  # checked before feature extraction; EmbeddingIndex checks it again
        if need and s.backend not in ("auto", need):
            raise UserError(f"--index {s.index} needs --backend {need} or auto ({s.backend} has no {s.index} search)")
        if s.rerank is not None and (s.index not in ("bf16", "auto") or s.rerank < 0):
            raise UserError(f"--rerank {s.rerank}: only with --index bf16 or auto, and at least 0")
        for t in self.temps:
            # below MIN_KNN_TEMPERATURE the float32 vote exp(sim / T) overflows and every class ties
            check_number("--temperature", t, MIN_KNN_TEMPERATURE)
        check_temperatures(self.temps, "--temperature")
        if s.ks is not None:
            for k in s.ks:
                check_number("--k", k, 1, integer=True)
            check_k(s.ks, name="--k")
        check_number("--batch-size", s.batch_size, 1, integer=True)
        check_number("--workers", s.workers, 0, integer=True)
        if s.rerank is not None:
            check_number("--rerank", s.rerank, 0, integer=True)
        if "faiss" in (s.backend, need):  # found missing now, not after the features are extracted
            require_extra("faiss", "cpu")

    def run(self, output: Path, log: Callable[[str], None] = print) -> dict:
        s = self.s
        ks: tuple = ()

        def check_bank(train) -> None:
            nonlocal ks
            ks = _choose_ks(s.ks, len(train), f" training images in '{s.train_data}'")

        inputs = EvalInputs.build(s, output, log, check_train=check_bank)
        with inputs.writing_output(s.overwrite):  # locked: one evaluation at a time writes here
            from simsiam_kit.engine.loggers import tensorboard_note

            if tensorboard_note(s.tensorboard):
                log(tensorboard_note(s.tensorboard))
            feats = self._features(inputs, ks, log)
            kind, index_choice = self._index_kind(feats, log)
            res = classify(
                feats["fb"], feats["lb"], feats["fq"], feats["lq"], feats["ks"], self.temps, len(inputs.classes),
                s.backend, kind, rerank=s.rerank,
            )  # fmt: skip
            res.update(index_chosen=kind, index_choice=index_choice)
            results = self._results(inputs, feats, res)
            self.write(inputs, feats, res, results)
            return results

    def _features(self, inputs: EvalInputs, ks: tuple, log: Callable[[str], None] = print) -> dict:
        """Features of both sets (saved under OUTPUT/features), the k that fit the readable bank, and what
        ``--skip-bad-images`` left out (logged in one line)."""
        from simsiam_kit.evaluation.common import skipped_images, skipped_line
        from simsiam_kit.features import extract_features, save_features

        backbone = inputs.loaded.model.to(inputs.device)
        kw = inputs.feature_kwargs(self.s.batch_size, self.s.workers)
        t0 = time.perf_counter()
        fb, lb, ib = extract_features(backbone, inputs.train, **kw)
        fq, lq, iq = extract_features(backbone, inputs.test, **kw)
        extract_s = time.perf_counter() - t0
        if len(fb) == 0 or len(fq) == 0:
            raise UserError("no readable images left after skipping unreadable ones")
        skipped = {"train": skipped_images(inputs.train, ib), "test": skipped_images(inputs.test, iq)}
        if skipped_line(skipped):
            log(skipped_line(skipped))
        ks = _choose_ks(self.s.ks, len(fb), " readable training images", ks)
        out = inputs.output
        save_features(out / "features" / "train", fb, lb, [inputs.train.ids[i] for i in ib.tolist()])
        save_features(out / "features" / "test", fq, lq, [inputs.test.ids[i] for i in iq.tolist()])
        return dict(fb=fb, lb=lb, ib=ib, fq=fq, lq=lq, iq=iq, ks=ks, extract_s=extract_s, skipped=skipped)

    def _index_kind(self, feats: dict, log: Callable[[str], None]) -> tuple[str, Optional[dict]]:
        """The index kind to search with: ``--index`` as given, or for ``auto`` exact or bf16 by measured speed
        and recall on these features (:func:`simsiam_kit.retrieval.index_choice.choose_index_kind`)."""
        s = self.s
        if s.index != "auto":
            return s.index, None
        from simsiam_kit.retrieval.index_choice import choose_index_kind

        choice = choose_index_kind(feats["fb"], feats["fq"], max(feats["ks"]), s.backend, rerank=s.rerank)
        log(f"--index auto: {choice['kind']} ({choice['reason']})")
        return choice["kind"], choice

    def _results(self, inputs: EvalInputs, feats: dict, res: dict) -> dict:
        ks, temps, fb, fq = feats["ks"], self.temps, feats["fb"], feats["fq"]
        main_k, main_t = int(ks[0]), temps[0]
        main = res["per_k"][main_k]
        settings = asdict(self.s)
        settings.update(ks=list(ks), temperatures=list(temps))
        settings.update(inputs.settings_record())
        settings.update(
            backend=res["backend"],
            index_chosen=res["index_chosen"],
            index_choice=res["index_choice"],
            bank_size=int(len(fb)),
            queries=int(len(fq)),
            feature_dim=int(fb.shape[1]),
            search_depth=res["depth"],
            num_classes=len(inputs.classes),
        )
        return {
            "top1": main["top1"],
            "top5": main["top5"],
            "k": main_k,
            "temperature": main_t,
            "headline": {"k": main_k, "temperature": main_t},
            "per_k": {str(k): {"top1": res["per_k"][k]["top1"], "top5": res["per_k"][k]["top5"]} for k in sorted(ks)},
            "grid": [
                {"k": k, "temperature": t, "top1": g["top1"], "top5": g["top5"]}
                for (k, t), g in sorted(res["grid"].items())
            ],
            **res["retrieval"],
            "map_at_r_depth": res["depth"],
            "weights": inputs.loaded.record,
            "settings": settings,
            "timing_s": {"features": round(feats["extract_s"], 3), "search": round(res["search_s"], 3)},
            "approximate": res["approximate"],  # null for the exact search
            "skipped_images": feats["skipped"],  # --skip-bad-images: how many (and which) were left out
            "classes": [str(c) for c in inputs.classes],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def write(self, inputs: EvalInputs, feats: dict, res: dict, results: dict) -> None:
        """The index (``save_index``), confusion matrix, plots, TensorBoard scalars and results.json (last),
        each atomically (a full disk is one line naming the file)."""
        from simsiam_kit.utils.io import atomic_save_npy, atomic_write_json

        output, classes = inputs.output, inputs.classes
        if self.s.save_index:
            res["index"].save(output / "index")
        main_k, main_t = results["k"], results["temperature"]
        cm = confusion_matrix(res["per_k"][main_k]["pred"], feats["lq"], len(classes))
        atomic_save_npy(output / "confusion_matrix.npy", cm)
        if self.s.plots:
            plots = output / "plots"
            plots.mkdir(exist_ok=True)
            title = f"kNN k={main_k} T={main_t:g}: top-1 {results['top1']:.2f}%"
            plot_confusion(cm, classes, plots / "confusion_matrix.png", title)
            self._neighbour_grid(inputs, feats, res, plots / "neighbours.png")
            results["plots"] = ["plots/confusion_matrix.png", "plots/neighbours.png"]
        _to_tensorboard(output, self.s.tensorboard, results)
        atomic_write_json(output / "results.json", results)

    def _neighbour_grid(self, inputs: EvalInputs, feats: dict, res: dict, path: Path) -> None:
        fq, iq, lq, ib, lb = feats["fq"], feats["iq"], feats["lq"], feats["ib"], feats["lb"]
        nq = min(self.s.grid_queries, len(fq))
        rows = np.linspace(0, len(fq) - 1, nq).round().astype(int)
        nn_ = min(self.s.grid_neighbours, res["depth"])
        ids = res["ids"][rows, :nn_].numpy()
        plot_neighbour_grid(
            inputs.test,
            iq[rows].numpy(),
            inputs.train,
            ib.numpy()[ids],
            res["sims"][rows, :nn_].numpy(),
            lq[rows].tolist(),
            lb.numpy()[ids],
            [str(c) for c in inputs.classes],
            path,
        )


def _to_tensorboard(output: Path, tensorboard: Optional[bool], results: dict) -> None:
    """The results' scalars (every k x T of the grid, recall@K, mAP@R) in ``OUTPUT/tensorboard``, beside the
    linear probe's and the run's own, so ``tensorboard --logdir runs/`` shows them together."""
    from simsiam_kit.engine.loggers import closing_all, make_sinks

    with closing_all(make_sinks(output, tensorboard)) as sinks:
        rec = {"type": "knn", "step": 0, "top1": results["top1"], "top5": results["top5"]}
        rec.update({f"top1_k{g['k']}_T{g['temperature']:g}": g["top1"] for g in results["grid"]})
        rec.update({k: results[k] for k in ("recall@1", "recall@5", "recall@10", "map_at_r") if k in results})
        for sink in sinks:
            sink.scalars(rec)


def results_table(results: dict) -> str:
    from simsiam_kit.evaluation.common import format_table

    st = results["settings"]
    temps = sorted({g["temperature"] for g in results.get("grid", [])}) or [results["temperature"]]
    by = {(g["k"], g["temperature"]): g for g in results.get("grid", [])}
    rows = []
    for k, v in results["per_k"].items():
        row = [k]
        for t in temps:
            g = by.get((int(k), t), v if t == results["temperature"] else None)
            mark = " *" if (int(k), t) == (results["k"], results["temperature"]) else ""
            row.append(f"{g['top1']:.2f}{mark}" if g else "-")
        row.append(v["top5"])
        rows.append(row)
    head = (
        f"kNN {st['arch']}/{st['stem']} on {st['queries']} queries, bank {st['bank_size']} x {st['feature_dim']}, "
        f"backend {st['backend']} ({st['index']}); * = headline (k={results['k']}, T={results['temperature']})"
    )
    retr = "  ".join(f"{k} {results[k]:.2f}" for k in ("recall@1", "recall@5", "recall@10") if k in results)
    cols = ["k"] + [f"top-1 % T={t:g}" for t in temps] + [f"top-5 % T={results['temperature']:g}"]
    text = (
        head
        + "\n"
        + format_table(cols, rows)
        + "\n"
        + f"retrieval: {retr}  mAP@R {results['map_at_r']:.2f} (R <= {results['map_at_r_depth']})"
    )
    a = results.get("approximate")
    if a:
        how = f"bf16 similarities, rerank {a['rerank']}" if a["kind"] == "bf16" else a["kind"]
        text += (
            f"\nAPPROXIMATE search ({how}): recall@{a['recall_k']} of the exact neighbours "
            f"{a['recall_at_k']:.4f} (worst query {a['min_recall_at_k']:.3f}), same prediction as the exact "
            f"search for {a['same_prediction_pct']:.1f} % of {a['checked_queries']} checked queries"
        )
    return text
