"""Shared pieces of the evaluations: datasets with clear errors, the image settings of an evaluation
(the core's one resolver, :func:`simsiam_kit.image_settings.resolve_image_settings`), output
directories that never lose earlier results, small text tables.

Weights are the core's business (:mod:`simsiam_kit.weights`: one resolver of a weights spec, each file
read once); this module only decides where an evaluation writes."""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from simsiam_kit.config import DEFAULT_DATA_ROOT
from simsiam_kit.data import load_dataset
from simsiam_kit.data.datasets import ImageDataset
from simsiam_kit.errors import UserError
from simsiam_kit.image_settings import ImageSettings, resolve_image_settings
from simsiam_kit.weights import LoadedBackbone, resolve_weights

# What an evaluation writes in its output directory (removed before a rerun with overwrite)
EVAL_FILES = (
    "results.json",
    "features",
    "plots",
    "confusion_matrix.npy",
    "index",
    "head.pt",
    "metrics.jsonl",
    "tensorboard",
)


class OutputExists(UserError):
    """The output directory holds the results of an earlier evaluation; they are kept."""

    remedy = "overwrite"


def eval_image_settings(
    loaded: LoadedBackbone,
    ds: ImageDataset,
    image_size: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> ImageSettings:
    """The evaluation's image size and normalisation: option > weights metadata > run config > default
    (in-memory images at their own size)."""
    return resolve_image_settings(
        option={"image_size": image_size, "mean": mean, "std": std},
        weights=loaded.weights_settings,
        config=loaded.config_settings,
        stem=loaded.stem,
        data_size=int(ds.images.shape[1]) if ds.in_memory else None,
    )


def default_output(weights: str, kind: str, like: Optional[str] = None) -> Path:
    """``RUN/eval/<kind>`` for a run directory, ``RUN/eval/<kind>-random-init`` for random weights like a
    run, else ``runs/eval-<kind>-<time>``."""
    ws = resolve_weights(weights, like)
    if ws.random and ws.run_dir is not None:
        return ws.run_dir / "eval" / f"{kind}-random-init"
    if not ws.random and ws.path is None:  # the spec is a run directory
        return ws.run_dir / "eval" / kind
    return Path("runs") / f"eval-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_output(output: Path, overwrite: bool = False) -> None:
    """Refuse a directory that holds an earlier evaluation's results, unless ``overwrite`` (cheap: call it
    before any work)."""
    res = Path(output) / "results.json"
    if res.exists() and not overwrite:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(res.stat().st_mtime))
        raise OutputExists(
            f"{output} already holds the results of an earlier evaluation ({res.name} of {when}); they are kept"
        )


@contextmanager
def writing_output(output: Path, overwrite: bool = False):
    """Hold ``output``'s lock (the project's one directory lock, ``OUTPUT/.lock``:
    :class:`~simsiam_kit.utils.dirlock.DirLock`, as pretraining holds its run directory's) while an evaluation
    writes there, after :func:`prepare_output`: a second evaluation into the same directory at the same time is
    refused with one line naming the holder's pid, instead of replacing the first one's files. Released when the
    block ends (the kernel releases it if the process dies)."""
    from simsiam_kit.utils.dirlock import DirLock

    lock = DirLock(output, "another simsiam-kit run is using this directory", "an evaluation's output directory")
    lock.acquire()
    try:
        yield prepare_output(output, overwrite)
    finally:
        lock.release()


def prepare_output(output: Path, overwrite: bool = False) -> Path:
    """Create ``output``; with ``overwrite`` remove what an earlier evaluation wrote there (only its own
    files), so no stale plot or feature file is mistaken for the new results."""
    output = Path(output)
    check_output(output, overwrite)
    if overwrite and output.is_dir():
        for name in EVAL_FILES:
            p = output / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    output.mkdir(parents=True, exist_ok=True)
    return output


def load_labelled(
    spec: str, role: str, root: str = DEFAULT_DATA_ROOT, download: bool = False, skip_bad_images: bool = False
) -> ImageDataset:
    ds = load_dataset(spec, root, download, skip_bad_images)
    if len(ds) == 0:
        raise UserError(f"{role} dataset '{spec}' is empty")
    if not ds.has_labels:
        raise UserError(f"{role} dataset '{spec}' has unlabelled images (label -1); evaluation needs labels")
    return ds


def skipped_images(ds: ImageDataset, kept_index, show: int = 10) -> dict:
    """What ``--skip-bad-images`` left out of ``ds``: ``{"count": N, "ids": [the first ``show`` ids]}``, from the
    dataset positions that were kept (the index returned by feature extraction)."""
    kept = set(int(i) for i in kept_index)
    missing = [i for i in range(len(ds)) if i not in kept]
    return {"count": len(missing), "ids": [str(ds.ids[i]) for i in missing[:show]]}


def skipped_line(skipped: dict) -> Optional[str]:
    """One line for the log when images were skipped (``skipped``: role -> :func:`skipped_images`), else None."""
    parts = [f"{role} {s['count']}" for role, s in skipped.items() if s["count"]]
    if not parts:
        return None
    first = next(s["ids"] for s in skipped.values() if s["count"])
    return (
        f"--skip-bad-images: skipped {sum(s['count'] for s in skipped.values())} unreadable images "
        f"({', '.join(parts)}; first: {', '.join(first[:3])}); results.json lists them under 'skipped_images'"
    )


def check_same_classes(train: ImageDataset, test: ImageDataset, train_spec: str, test_spec: str) -> list:
    """The two sets must share one class list; returns it (names, or indices as strings)."""
    if train.classes is not None and test.classes is not None:
        if list(train.classes) != list(test.classes):
            only_train = [c for c in train.classes if c not in test.classes]
            only_test = [c for c in test.classes if c not in train.classes]
            detail = []
            if only_train:
                detail.append(f"only in train: {', '.join(map(str, only_train[:5]))}")
            if only_test:
                detail.append(f"only in test: {', '.join(map(str, only_test[:5]))}")
            if not detail:
                detail.append("same names in a different order")
            raise UserError(
                f"train '{train_spec}' and test '{test_spec}' have different class lists "
                f"({len(train.classes)} vs {len(test.classes)} classes; {'; '.join(detail)})"
            )
        return list(train.classes)
    n_train = train.num_classes
    extra = sorted(set(np.unique(test.labels).tolist()) - set(np.unique(train.labels).tolist()))
    if extra:
        raise UserError(
            f"test '{test_spec}' has labels not present in train '{train_spec}': {', '.join(map(str, extra[:10]))}"
        )
    names = train.classes or test.classes
    return list(names) if names is not None else [str(i) for i in range(max(n_train, test.num_classes))]


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in header]] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# the settings two evaluations must share to be compared row by row
_SAME = {
    "knn": ("train_data", "test_data", "image_size", "mean", "std", "precision"),
    "linear": (
        "train_data",
        "test_data",
        "image_size",
        "mean",
        "std",
        "precision",
        "epochs",
        "protocol",
        "batch_size",
        "lr",
        "optimizer",
        "seed",
    ),
}


def _pair_path(kind: str, record: dict) -> Optional[Path]:
    if record.get("kind") == "random":
        return Path(record["like"]) / "eval" / kind / "results.json" if record.get("like") else None
    if record.get("run_dir"):
        return Path(record["run_dir"]) / "eval" / f"{kind}-random-init" / "results.json"
    return None


def _compared_keys(kind: str, settings: dict) -> tuple:
    """The settings two evaluations must share; an lr sweep picks each backbone's own lr (that is its point),
    so swept runs are compared at their chosen lr."""
    keys = _SAME[kind]
    if kind == "linear" and "lr sweep" in str(settings.get("protocol", "")):
        keys = tuple(k for k in keys if k != "lr")
    return keys


def baseline_comparison(kind: str, results: dict) -> tuple[Optional[list], Optional[str]]:
    """``(rows, None)`` when this evaluation is the trained or the random-init one of a run and the other one
    exists at its default place (``RUN/eval/<kind>`` and ``RUN/eval/<kind>-random-init``) with the same data
    and settings: ``[[label, top1, top5], [label, top1, top5]]``, trained first. Else ``(None, why)``: why
    there is no comparison row (the other evaluation missing, or differing in a named setting); ``why`` is
    None when this evaluation belongs to no run."""
    import json

    rec = results.get("weights") or {}
    other_path = _pair_path(kind, rec)
    if other_path is None:
        return None, None
    if not other_path.is_file():
        hint = "" if rec.get("kind") == "random" else f" (simsiam-kit eval {kind} --weights random --like RUN)"
        return None, f"no results at {other_path.parent} yet{hint}"
    try:
        other = json.loads(other_path.read_text())
    except (OSError, ValueError):
        return None, f"{other_path} cannot be read"
    a, b = results.get("settings", {}), other.get("settings", {})
    differ = [k for k in _compared_keys(kind, a) if a.get(k) != b.get(k)]
    if kind == "knn":
        differ += [k for k in ("k", "temperature") if results.get(k) != other.get(k)]
    if differ:
        k = differ[0]
        mine, theirs = (results.get(k), other.get(k)) if k in ("k", "temperature") else (a.get(k), b.get(k))
        return None, f"{other_path} differs in {', '.join(differ)} ({k}: {mine!r} here, {theirs!r} there)"
    rows = []
    for r in (results, other):
        w = r.get("weights") or {}
        if w.get("kind") == "random":
            label = f"random init ({Path(w['like']).name}, seed {w['seed']})"
        else:
            label = (
                "SimSiam "
                + Path(w.get("run_dir") or w.get("file") or "?").name
                + (f" (epoch {w['epoch']})" if w.get("epoch") is not None else "")
            )
        rows.append([label, r["top1"], r["top5"]])
    return sorted(rows, key=lambda row: row[0].startswith("random")), None


def baseline_rows(kind: str, results: dict) -> Optional[list]:
    """The rows of :func:`baseline_comparison` (None when there is no comparison)."""
    return baseline_comparison(kind, results)[0]


def baseline_table(kind: str, results: dict) -> Optional[str]:
    """The comparison with the run's own random init (or trained backbone), or one line saying why there is
    none; None for an evaluation that belongs to no run."""
    rows, why = baseline_comparison(kind, results)
    if rows is None:
        other = "trained backbone" if (results.get("weights") or {}).get("kind") == "random" else "random init"
        return f"no comparison with the run's {other}: {why}" if why else None
    what = f"k={results['k']}, T={results['temperature']:g}" if kind == "knn" else results["settings"]["protocol"]
    return f"against the run's own random init ({what}, same data and image settings):\n" + format_table(
        ["backbone", "top-1 %", "top-5 %"], rows
    )
