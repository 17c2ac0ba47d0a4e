"""Bad inputs, one row each (issue 11): the command exits 2 with exactly one line on stderr that names the
file, key or value, prints no traceback, and loses nothing in the run directory it was pointed at (every
file there before the command is unchanged after it, unless the row says which may change).

Rows run in-process through Typer's CliRunner, except those that need a resource limit (a subprocess).
Part A's rows are bad values, paths and run directories; part B's (:func:`_hostile_rows`) are hostile and
malformed files: YAML bombs and binary configs, corrupt FAISS/.npy/JSON files of an embedding directory,
ONNX models whose metadata or graph lie, and pickles that would run code (built by ``tests/reliability/hostile.py``;
the bounds themselves are unit-tested in ``tests/reliability/test_untrusted_files.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from simsiam_kit.cli import app

from helpers import DATA, REPO, need, tiny_overrides
from reliability import hostile

runner = CliRunner()


def sets(overrides) -> list[str]:
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


@dataclass
class Case:
    args: list
    needles: list  # substrings of the one stderr line (the file/key/value it must name)
    watch: Optional[Path] = None  # a run directory whose files must survive the command
    may_change: tuple = ()  # files of ``watch`` the command may rewrite (relative paths)
    subprocess_limit_fsize: Optional[int] = None  # run as a subprocess under `ulimit -f` (bytes)
    after: Optional[Callable[[], None]] = None  # extra checks
    hold_lock: bool = False  # hold the lock of ``watch`` while the command runs
    env: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# inputs


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """Shared inputs: a tiny npz, a finished 1-epoch run, bad-label npz files, a corrupt ImageFolder,
    a backbone with a NaN."""
    d = tmp_path_factory.mktemp("bad")
    with np.load(need(DATA / "cifar10" / "val.npz")) as z:
        keep = np.flatnonzero(z["labels"] < 3)[:48]
        images = np.ascontiguousarray(z["images"][keep][:, 8:24, 8:24])
        labels = z["labels"][keep].astype(np.int64)
    names = np.array(["airplane", "automobile", "bird"])
    np.savez(d / "tiny.npz", images=images, labels=labels, class_names=names)
    bad = {
        "labels_float": dict(labels=labels.astype(np.float32)),
        "labels_2d": dict(labels=np.stack([labels, labels], 1)),
        "labels_short": dict(labels=labels[:40]),
        "labels_out_of_range": dict(labels=np.where(np.arange(48) == 5, 7, labels), class_names=names),
        "labels_huge": dict(labels=np.where(np.arange(48) == 5, 2**40, labels)),
        "labels_negative": dict(labels=np.where(np.arange(48) == 5, -5, labels)),
    }
    for k, v in bad.items():
        np.savez(d / f"{k}.npz", images=images, **v)
    # a finished run (1 epoch) to resume, to refuse, to copy
    base = d / "run"
    r = runner.invoke(app, ["pretrain", "--output", str(base)] + sets(tiny_overrides(str(d / "tiny.npz"), None)))
    assert r.exit_code == 0, r.output
    # a backbone.pt with one NaN
    bb = torch.load(base / "backbone.pt", weights_only=True)
    bb["state_dict"]["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(bb, d / "nan_backbone.pt")
    # an ImageFolder with one truncated PNG
    folder = d / "folder"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                folder / c / f"{i}.png"
            )
    (folder / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00truncated")
    (d / "a_file").write_text("not a directory\n")
    return d


def _copy_run(ctx: Path, name: str) -> Path:
    dst = ctx / "copies" / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(ctx / "run", dst)
    return dst


def _tiny(ctx: Path, **kw) -> list[str]:
    return tiny_overrides(str(ctx / "tiny.npz"), None, **kw)


def _readonly_dir(ctx: Path) -> Path:
    """A directory this process cannot write in: chmod 555 (root ignores modes: /sys, read-only to all)."""
    if os.geteuid() == 0:
        return Path("/sys/simsiam-kit-test")
    ro = ctx / "readonly"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    return ro


def _poison_checkpoint(run: Path, mutate: Callable[[dict], None]) -> None:
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    mutate(ck)
    torch.save(ck, run / "checkpoints" / "last.pt")


def _nan_model(ck):
    ck["model"]["backbone.conv1.weight"][0, 0, 0, 0] = float("nan")


def _reshape_projector(ck):
    k = next(k for k in ck["model"] if k.startswith("projector.") and k.endswith("weight") and ck["model"][k].ndim == 2)
    ck["model"][k] = torch.zeros(ck["model"][k].shape[0] + 1, ck["model"][k].shape[1])


def _checkpoint_epoch(path: Path, epoch: int) -> Callable[[], None]:
    def check():
        ck = torch.load(path / "checkpoints" / "last.pt", weights_only=True)
        assert ck["epoch"] == epoch
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())

    return check


def _absent(*paths: Path) -> Callable[[], None]:
    def check():
        for p in paths:
            assert not p.exists(), p

    return check


# ---------------------------------------------------------------------------------------------
# the table


def _rows(c: Path, new: Path) -> dict[str, Callable[[], Case]]:
    """``c``: the shared inputs; ``new``: a fresh output directory of the row's own."""

    def pre(*o):
        return ["pretrain", "--output", str(new)] + sets(_tiny(c) + list(o))

    def knn(train, test, output=None):
        return [
            "eval",
            "knn",
            "--weights",
            "random",
            "--arch",
            "resnet18",
            "--stem",
            "cifar",
            "--image-size",
            "16",
            "--train-data",
            train,
            "--test-data",
            test,
            "--k",
            "5",
            "--output",
            str(output or new / "knn"),
            "--no-plots",
        ]

    tiny = str(c / "tiny.npz")
    rows: dict[str, Callable[[], Case]] = {
        # --- config values (defect 10): one line naming the key and the value
        "seed negative": lambda: Case(pre("train.seed=-1"), ["'train.seed'", "-1"]),
        "seed above 2**32-1": lambda: Case(pre("train.seed=4294967296"), ["'train.seed'", "4294967296"]),
        "momentum -5": lambda: Case(pre("optim.momentum=-5"), ["'optim.momentum'", "-5"]),
        "pred_hidden 0": lambda: Case(pre("model.pred_hidden=0"), ["'model.pred_hidden'", "0"]),
        "proj_dim 0": lambda: Case(pre("model.proj_dim=0"), ["'model.proj_dim'", "0"]),
        "flip_prob 7": lambda: Case(pre("data.flip_prob=7"), ["'data.flip_prob'", "7"]),
        "grayscale_prob 2": lambda: Case(pre("data.grayscale_prob=2"), ["'data.grayscale_prob'", "2"]),
        "blur_prob -0.5": lambda: Case(pre("data.blur_prob=-0.5"), ["'data.blur_prob'", "-0.5"]),
        "color_jitter_prob 1.5": lambda: Case(pre("data.color_jitter_prob=1.5"), ["'data.color_jitter_prob'", "1.5"]),
        "hue 5": lambda: Case(pre("data.color_jitter=[0.4,0.4,0.4,5]"), ["'data.color_jitter'", "5.0", "hue"]),
        "jitter strength -1": lambda: Case(pre("data.color_jitter=[-1,0.4,0.4,0.1]"), ["'data.color_jitter'", "-1.0"]),
        "knn_temperature 0": lambda: Case(pre("train.knn_temperature=0"), ["'train.knn_temperature'", "0"]),
        "workers -1": lambda: Case(pre("data.workers=-1"), ["'data.workers'", "-1"]),
        "base_lr inf": lambda: Case(
            pre("optim.base_lr=.inf", "train.max_steps_per_epoch=1"),
            ["'optim.base_lr'", "inf"],
            after=_absent(new / "checkpoints/last.pt"),
        ),
        "weight_decay nan": lambda: Case(
            pre("optim.weight_decay=.nan", "train.max_steps_per_epoch=1"),
            ["'optim.weight_decay'", "nan"],
            after=_absent(new / "checkpoints/last.pt"),
        ),
        "base_lr beyond float32": lambda: Case(pre("optim.base_lr=1e300"), ["'optim.base_lr'", "1e+300"]),
        "dist_timeout_s 0": lambda: Case(pre("train.dist_timeout_s=0"), ["'train.dist_timeout_s'", "0"]),
        # --- non-finite weights (defect 1)
        "update to inf weights, first epoch": lambda: Case(
            pre("optim.base_lr=1e37", "optim.weight_decay=1e38", "train.max_steps_per_epoch=1"),
            ["weights became non-finite", "model.backbone.conv1.weight"],
            after=_absent(new / "checkpoints/last.pt", new / "backbone.pt"),
        ),
        "update to inf weights, second epoch": lambda: Case(
            pre(
                "optim.base_lr=1e37",
                "optim.weight_decay=1e38",
                "train.max_steps_per_epoch=1",
                "optim.warmup_epochs=1",
                "optim.epochs=2",
            ),  # epoch 1 at lr 0: its files must stay
            ["weights became non-finite", "epoch 2", "last good checkpoint"],
            after=_checkpoint_epoch(new, 1),
        ),
        "eval knn on nan weights": lambda: Case(
            [
                "eval",
                "knn",
                "--weights",
                str(c / "nan_backbone.pt"),
                "--train-data",
                tiny,
                "--test-data",
                tiny,
                "--k",
                "5",
                "--output",
                str(new / "knn"),
                "--no-plots",
            ],
            [str(c / "nan_backbone.pt"), "non-finite", "layer1.0.conv1.weight"],
            after=_absent(new / "knn"),
        ),
        "export onnx on nan weights": lambda: Case(
            ["export", "onnx", "--weights", str(c / "nan_backbone.pt"), "--output", str(new / "nan.onnx")],
            [str(c / "nan_backbone.pt"), "non-finite"],
            after=_absent(new / "nan.onnx"),
        ),
        "resume from nan checkpoint": lambda: _resume_case(
            c, "nan-ckpt", _nan_model, ["optim.epochs=2"], ["last.pt", "non-finite", "backbone.conv1.weight"]
        ),
        # --- run directory (defects 3, 4, 6, 10, 11)
        "run directory locked by another run": lambda: Case(
            ["pretrain", "--output", str(c / "run"), "--resume"] + sets(_tiny(c)),
            [str(c / "run"), "another simsiam-kit run is using this directory"],
            watch=c / "run",
            hold_lock=True,
        ),
        "non-empty directory, not a run": lambda: _nonempty_case(c),
        "directory holding a run, no --resume": lambda: Case(
            ["pretrain", "--output", str(c / "run")] + sets(_tiny(c)),
            [str(c / "run"), "already holds a run", "--resume", "--overwrite"],
            watch=c / "run",
        ),
        "--resume on a finished run": lambda: Case(
            ["pretrain", "--output", str(c / "run"), "--resume"] + sets(_tiny(c)),
            ["last.pt", "already finished", "1/1 epochs", "optim.epochs"],
            watch=c / "run",
        ),
        "--resume with --overwrite": lambda: Case(
            ["pretrain", "--output", str(c / "run"), "--resume", "--overwrite"],
            ["--resume", "--overwrite"],
            watch=c / "run",
        ),
        "--resume --set that changes the run": lambda: Case(
            ["pretrain", "--output", str(c / "run"), "--resume"]
            + sets(_tiny(c) + ["optim.epochs=2", "data.image_size=24"]),
            ["'data.image_size'", "16", "24"],
            watch=c / "run",
        ),
        "--resume --set of the model shape": lambda: Case(
            ["pretrain", "--output", str(c / "run"), "--resume"]
            + sets(_tiny(c) + ["optim.epochs=2", "model.proj_dim=32"]),
            ["'model.proj_dim'", "64", "32"],
            watch=c / "run",
        ),
        "--resume from a checkpoint of another shape": lambda: _resume_case(
            c, "shape", _reshape_projector, ["optim.epochs=2"], ["last.pt", "'model' state does not fit"]
        ),
        # --- OS errors (defect 7)
        "pretrain --output is a file": lambda: Case(
            ["pretrain", "--output", str(c / "a_file")] + sets(_tiny(c)), [str(c / "a_file"), "not a directory"]
        ),
        "pretrain --output under a file": lambda: Case(
            ["pretrain", "--output", str(c / "a_file" / "run")] + sets(_tiny(c)), [str(c / "a_file"), "Not a directory"]
        ),
        "pretrain --output unusable (/proc)": lambda: Case(
            ["pretrain", "--output", "/proc/simsiam-kit-run"] + sets(_tiny(c)), ["/proc/simsiam-kit-run"]
        ),
        "pretrain --output read-only": lambda: Case(
            ["pretrain", "--output", str(_readonly_dir(c) / "run")] + sets(_tiny(c)), [str(_readonly_dir(c))]
        ),
        "eval knn --output under a file": lambda: Case(knn(tiny, tiny, c / "a_file" / "knn"), [str(c / "a_file")]),
        "export onnx --output under a file": lambda: Case(
            ["export", "onnx", "--weights", str(c / "run"), "--output", str(c / "a_file" / "m.onnx")],
            [str(c / "a_file")],
        ),
        "disk full (ulimit -f) while saving": lambda: _disk_full_case(c),
        # --- labels (defect 5), at load time, for pretraining and for evaluation
        "pretrain: float labels": lambda: Case(
            pre(f"data.train={c / 'labels_float.npz'}"), ["labels_float.npz", "must be integers", "float32"]
        ),
        "pretrain: 2-D labels": lambda: Case(
            pre(f"data.train={c / 'labels_2d.npz'}"), ["labels_2d.npz", "1-D", "(48, 2)"]
        ),
        "pretrain: fewer labels than images": lambda: Case(
            pre(f"data.train={c / 'labels_short.npz'}"), ["labels_short.npz", "48 images but 40 labels"]
        ),
        "pretrain: kNN-monitor labels outside the class list": lambda: Case(
            pre(f"data.val={c / 'labels_out_of_range.npz'}", "train.knn_every=1"),
            ["labels_out_of_range.npz", "label 7 out of range", "3 class names"],
        ),
        "pretrain: label 2**40": lambda: Case(
            pre(f"data.train={c / 'labels_huge.npz'}"), ["labels_huge.npz", f"label {2**40} out of range"]
        ),
        "eval knn: labels outside the class list": lambda: Case(
            knn(str(c / "labels_out_of_range.npz"), tiny), ["labels_out_of_range.npz", "label 7 out of range"]
        ),
        "eval knn: label -5": lambda: Case(
            knn(tiny, str(c / "labels_negative.npz")), ["labels_negative.npz", "label -5 out of range"]
        ),
        "eval linear: float labels": lambda: Case(
            [
                "eval",
                "linear",
                "--weights",
                "random",
                "--arch",
                "resnet18",
                "--stem",
                "cifar",
                "--train-data",
                str(c / "labels_float.npz"),
                "--test-data",
                tiny,
                "--epochs",
                "1",
                "--output",
                str(new / "linear"),
            ],
            ["labels_float.npz", "must be integers"],
        ),
        # --- a corrupt image read by a DataLoader worker (defect 10)
        "corrupt image in a DataLoader worker": lambda: Case(
            pre(f"data.train={c / 'folder'}", "data.workers=2", "optim.batch_size=8"), ["cannot read image", "3.png"]
        ),
    }
    rows.update(_hostile_rows(c, new))
    rows.update(_issue24_rows(c, new))
    rows.update(_issue24b_rows(c, new))
    rows.update(_issue24_embed_rows(c, new))
    return rows


# ---------------------------------------------------------------------------------------------
# part B: hostile and malformed files


def _hostile_dir(c: Path) -> Path:
    d = c / "hostile"
    d.mkdir(exist_ok=True)
    return d


def _encoder(c: Path) -> Path:
    p = _hostile_dir(c) / "encoder.onnx"
    return p if p.is_file() else hostile.onnx_encoder(p)


def _embedded(c: Path, backend: str) -> Path:
    """An embedding directory of tiny.npz (48 labelled images) built by `simsiam-kit embed`, once."""
    d = c / f"emb_{backend}"
    if not (d / "embed.json").is_file():
        r = runner.invoke(
            app,
            [
                "embed",
                "--model",
                str(_encoder(c)),
                "--data",
                str(c / "tiny.npz"),
                "--output",
                str(d),
                "--backend",
                backend,
                "--no-progress",
            ],
        )
        assert r.exit_code == 0, r.output
    return d


def _emb_copy(c: Path, name: str, mutate: Callable[[Path], object], backend: str = "faiss") -> Path:
    dst = c / "copies" / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(_embedded(c, backend), dst)
    mutate(dst)
    return dst


def _search_case(c: Path, name: str, mutate, needles, backend: str = "faiss", model: Optional[Path] = None) -> Case:
    d = _emb_copy(c, name, mutate, backend)
    args = ["search", "--index", str(d), "--query", str(c / "folder" / "a" / "0.png"), "--k", "3"]
    return Case(
        args + (["--model", str(model)] if model else []),
        [str(d / n) if n.startswith("/") else n for n in needles],
        watch=d,
    )


def _coco_args() -> list[str]:
    det = need(DATA / "coco128_det" / "instances_val.json").parent
    return [
        "--train-json",
        str(det / "instances_val.json"),
        "--train-images",
        str(det / "images"),
        "--val-json",
        str(det / "instances_val.json"),
        "--val-images",
        str(det / "images"),
    ]


def _d2_pkl_case(c: Path, new: Path, name: str, make, needles) -> Case:
    marker = _hostile_dir(c) / f"pwned-{name}"
    pkl = make(_hostile_dir(c) / f"{name}.pkl", marker)
    args = [
        "eval",
        "detection",
        "--weights",
        str(pkl),
        "--engine",
        "detectron2",
        "--config",
        "d2_coco_R_18_FPN_quick",
        *_coco_args(),
        "--output",
        str(new / "det"),
    ]
    return Case(args, [str(pkl), *needles], after=_absent(marker, new / "det"))


def _hostile_rows(c: Path, new: Path) -> dict[str, Callable[[], Case]]:
    h = _hostile_dir(c) if c.exists() else c

    def pre_config(path: Path, *o):
        return ["pretrain", "--config", str(path), "--output", str(new)] + sets(list(o))

    def embed(model: Path):
        return [
            "embed",
            "--model",
            str(model),
            "--data",
            str(c / "tiny.npz"),
            "--output",
            str(new / "emb"),
            "--no-progress",
        ]

    faiss_file = lambda d: d / "index.faiss"  # noqa: E731
    return {
        # --- YAML configs (defect 8): refused before they are parsed or copied
        "config: YAML alias bomb + --set": lambda: Case(
            pre_config(hostile.yaml_alias_bomb(h / "bomb.yaml"), "optim.epochs=1"),
            [str(h / "bomb.yaml"), "anchor '&a0' at line 1", "not allowed"],
            after=_absent(new),
        ),
        "config: binary file": lambda: Case(
            pre_config(hostile.yaml_binary(h / "binary.yaml")),
            [str(h / "binary.yaml"), "not a UTF-8 text file", "0x89"],
        ),
        "config: YAML nested 5000 deep": lambda: Case(
            pre_config(hostile.yaml_deep(h / "deep.yaml")), [str(h / "deep.yaml"), "nested too deeply"]
        ),
        "config: integer of 5000 digits": lambda: Case(
            pre_config(hostile.yaml_bigint(h / "bigint.yaml")),
            [str(h / "bigint.yaml"), "invalid YAML value", "5000 digits"],
        ),
        "config: 1 MiB file": lambda: Case(
            pre_config(hostile.yaml_huge(h / "huge.yaml")), [str(h / "huge.yaml"), "larger than 262144 bytes"]
        ),
        "detection config: YAML alias bomb": lambda: Case(
            [
                "eval",
                "detection",
                "--weights",
                "random",
                "--arch",
                "resnet18",
                "--config",
                str(hostile.yaml_alias_bomb(h / "det_bomb.yaml")),
                *_coco_args(),
                "--output",
                str(new / "det"),
            ],
            [str(h / "det_bomb.yaml"), "anchor '&a0'"],
            after=_absent(new / "det"),
        ),
        # --- detectron2 .pkl weights (defect 9): refused before detectron2 (or anything in them) runs
        "detectron2 .pkl: os.system via __reduce__": lambda: _d2_pkl_case(
            c, new, "system", hostile.pickle_os_system, ["refused to unpickle global 'posix.system'"]
        ),
        "detectron2 .pkl: builtins.eval": lambda: _d2_pkl_case(
            c, new, "eval", hostile.pickle_eval, ["refused to unpickle global 'builtins.eval'"]
        ),
        "detectron2 .pkl: a class of another module": lambda: _d2_pkl_case(
            c,
            new,
            "foreign",
            lambda p, m: hostile.pickle_foreign_class(p),
            ["refused to unpickle global 'reliability.hostile.Foreign'"],
        ),
        "detectron2 .pkl: object array": lambda: _d2_pkl_case(
            c, new, "objects", lambda p, m: hostile.pickle_object_array(p), ["numpy dtype object"]
        ),
        "detectron2 .pkl: 19 bytes declaring 1 TiB": lambda: _d2_pkl_case(
            c,
            new,
            "bytes8",
            lambda p, m: hostile.pickle_bytes8_bomb(p),
            ["not a readable pickle", "1099511627776 bytes"],
        ),
        "detectron2 .pkl: _reconstruct of 1 GiB": lambda: _d2_pkl_case(
            c,
            new,
            "reconstruct",
            lambda p, m: hostile.pickle_reconstruct_huge(p),
            ["_reconstruct with a non-empty shape (1073741824,)"],
        ),
        # --- embedding directories (defects 8 and 10)
        "search: index.faiss with 4 bytes changed": lambda: _search_case(
            c,
            "faiss-count",
            lambda d: hostile.patch_bytes(faiss_file(d), hostile.FLAT_COUNT_OFFSET + 4, b"\x01\x00\x00\x00"),
            [
                "/index.faiss",
                "corrupt or foreign FAISS index",
                "declares 4294967440 elements",
                "simsiam-kit index build --embeddings",  # the remedy names the command that rebuilds it in place
            ],
        ),
        "search: index.faiss ntotal changed": lambda: _search_case(
            c,
            "faiss-ntotal",
            lambda d: hostile.patch_bytes(faiss_file(d), hostile.FLAT_NTOTAL_OFFSET, (10**9).to_bytes(8, "little")),
            ["/index.faiss", "holds 1000000000 vectors, index.json says 48"],
        ),
        "search: index.faiss truncated": lambda: _search_case(
            c,
            "faiss-short",
            lambda d: faiss_file(d).write_bytes(faiss_file(d).read_bytes()[:300]),
            ["/index.faiss", "declares 144 elements (576 bytes)", "only 255 bytes remain"],
        ),
        "search: index.faiss of another kind": lambda: _search_case(
            c,
            "faiss-kind",
            lambda d: hostile.set_json(d / "index.json", kind="hnsw"),
            ["/index.faiss", "is not the hnsw index"],
        ),
        "search: index.json without 'ntotal'": lambda: _search_case(
            c,
            "json-key",
            lambda d: hostile.set_json(d / "index.json", ntotal=...),
            ["/index.json", "missing key 'ntotal'"],
        ),
        "search: index.json dim a string": lambda: _search_case(
            c,
            "json-type",
            lambda d: hostile.set_json(d / "index.json", dim="3"),
            ["/index.json", "key 'dim' must be an integer", "'3'"],
        ),
        "search: index.json binary": lambda: _search_case(
            c,
            "json-binary",
            lambda d: (d / "index.json").write_bytes(b"\xff\xfe\x00binary"),
            ["/index.json", "not UTF-8"],
        ),
        "search: embed.json nested 100000 deep": lambda: _search_case(
            c,
            "manifest-deep",
            lambda d: (d / "embed.json").write_text("[" * 100_000 + "]" * 100_000),
            ["/embed.json", "nested too deeply"],
        ),
        "search: embed.json model not a string": lambda: _search_case(
            c,
            "manifest-model",
            lambda d: hostile.set_json(d / "embed.json", model=[1, 2]),
            ["/embed.json", "key 'model' must be a string", "[1, 2]"],
        ),
        "search: ids.json missing": lambda: _search_case(
            c, "ids-missing", lambda d: (d / "ids.json").unlink(), ["/ids.json", "missing"]
        ),
        "search: labels.npy pickled": lambda: _search_case(
            c,
            "labels-pickle",
            lambda d: np.save(d / "labels.npy", np.array([hostile.Foreign()] * 48, dtype=object), allow_pickle=True),
            ["/labels.npy", "holds Python objects", "refused"],
        ),
        "search: labels shorter than embeddings": lambda: _search_case(
            c,
            "labels-short",
            lambda d: np.save(d / "labels.npy", np.load(d / "labels.npy")[:40]),
            ["/labels.npy", "40 labels for the 48 images of ids.json"],
        ),
        "search: labels.npy missing its data": lambda: _search_case(
            c,
            "labels-header",
            lambda d: hostile.npy_declaring(d / "labels.npy", (10**12,), "<i8"),
            ["/labels.npy", "header declares shape (1000000000000,)", "holds 0 bytes"],
        ),
        "search: index_vectors.npy missing (torch backend)": lambda: _search_case(
            c,
            "vectors-missing",
            lambda d: (d / "index_vectors.npy").unlink(),
            ["/index_vectors.npy", "missing"],
            backend="torch",
        ),
        "search: index_vectors.npy declaring 10**12 rows": lambda: _search_case(
            c,
            "vectors-header",
            lambda d: hostile.npy_declaring(d / "index_vectors.npy", (10**12, 3)),
            ["/index_vectors.npy", "header declares shape (1000000000000, 3)"],
            backend="torch",
        ),
        "search: index_vectors.npy of another shape": lambda: _search_case(
            c,
            "vectors-shape",
            lambda d: np.save(d / "index_vectors.npy", np.zeros((48, 5), np.float32)),
            ["/index_vectors.npy", "shape (48, 5), expected (48, 3)"],
            backend="torch",
        ),
        # --- ONNX models (defects 8 and 10)
        "embed: ONNX metadata image_size=60000": lambda: Case(
            embed(hostile.onnx_encoder(h / "size60000.onnx", meta={"image_size": "60000"})),
            [str(h / "size60000.onnx"), "image_size=60000 is outside 1..4096"],
            after=_absent(new / "emb"),
        ),
        "embed: ONNX model with a 1-D output": lambda: Case(
            embed(hostile.onnx_encoder(h / "one_d.onnx", one_d=True)),
            [str(h / "one_d.onnx"), "graph output 'embeddings' has shape ['batch']"],
            after=_absent(new / "emb"),
        ),
        "embed: ONNX graph input disagrees with its metadata": lambda: Case(
            embed(hostile.onnx_encoder(h / "input.onnx", size=64, input_size=4)),
            [str(h / "input.onnx"), "graph input 'images' has shape ['batch', 3, 4, 4]", "(N, 3, 64, 64)"],
            after=_absent(new / "emb"),
        ),
        "search: --model with a 1-D output": lambda: _search_case(
            c,
            "model-1d",
            lambda d: None,
            [str(h / "one_d2.onnx"), "graph output 'embeddings'"],
            model=hostile.onnx_encoder(h / "one_d2.onnx", one_d=True),
        ),
    }


# ---------------------------------------------------------------------------------------------
# issue 24 (part A): links and special files, alias bombs in --set, weights, annotations, sizes


def _issue24_dir(c: Path) -> Path:
    d = c / "issue24"
    d.mkdir(exist_ok=True)
    return d


def _victim(c: Path, name: str) -> tuple[Path, Callable[[], None]]:
    v = _issue24_dir(c) / f"victim-{name}.txt"
    v.write_text("precious\n")

    def intact():
        assert v.read_text() == "precious\n", f"{v} was overwritten"

    return v, intact


def _lock_link_case(c: Path, new: Path, resume: bool) -> Case:
    name = "lock-resume" if resume else "lock-new"
    victim, intact = _victim(c, name)
    run = _copy_run(c, name) if resume else new
    run.mkdir(parents=True, exist_ok=True)
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").symlink_to(victim)
    args = ["pretrain", "--output", str(run)] + (["--resume"] if resume else []) + sets(_tiny(c))
    return Case(args, [str(run / ".lock"), "symbolic link", "regular file"], watch=run, after=intact)


def _knn_weights(c: Path, new: Path, weights: str) -> list[str]:
    tiny = str(c / "tiny.npz")
    return ["eval", "knn", "--weights", weights, "--train-data", tiny, "--test-data", tiny, "--k", "5"] + [
        "--output",
        str(new / "knn"),
        "--no-plots",
    ]


def _int64_weights(c: Path) -> Path:
    p = _issue24_dir(c) / "int64.pt"
    sd = torch.load(c / "run" / "backbone.pt", weights_only=True)["state_dict"]
    torch.save({k: v.to(torch.int64) for k, v in sd.items()}, p)
    return p


def _bad_coco(c: Path, name: str, change) -> Path:
    src = need(DATA / "coco128_det" / "instances_val.json")
    d = json.loads(src.read_text())
    change(d)
    p = _issue24_dir(c) / f"{name}.json"
    p.write_text(json.dumps(d))
    return p


def _det_case(c: Path, new: Path, name: str, change, needles) -> Case:
    bad = _bad_coco(c, name, change)
    images = str(need(DATA / "coco128_det" / "images"))
    args = ["eval", "detection", "--weights", "random", "--arch", "resnet18", "--engine", "torchvision"] + [
        "--train-json",
        str(bad),
        "--train-images",
        images,
        "--val-json",
        str(bad),
        "--val-images",
        images,
        "--output",
        str(new / "det"),
    ]
    return Case(args, [str(bad), *needles], after=_absent(new / "det"))


def _set_box(i: int, box) -> Callable[[dict], None]:
    def change(d):
        d["annotations"][i]["bbox"] = box

    return change


def _issue24_rows(c: Path, new: Path) -> dict[str, Callable[[], Case]]:
    def pre(*o):
        return ["pretrain", "--output", str(new)] + sets(_tiny(c) + list(o))

    bomb = (
        "[&a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol], "
        + ", ".join(f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9))
        + "]"
    )

    def zero_npz() -> str:
        p = _issue24_dir(c) / "zero_size.npz"
        np.savez(p, images=np.zeros((8, 0, 0, 3), np.uint8), labels=np.zeros(8, np.int64))
        return str(p)

    def linked(name: str, target: str) -> str:
        p = _issue24_dir(c) / name
        if not p.is_symlink():
            p.symlink_to(target)
        return str(p)

    return {
        "pretrain: .lock a symlink to another file (new run)": lambda: _lock_link_case(c, new, resume=False),
        "pretrain --resume: .lock a symlink to another file": lambda: _lock_link_case(c, new, resume=True),
        "pretrain: alias bomb in a --set value": lambda: Case(
            pre(f"log.wandb_project={bomb}"), ["--set log.wandb_project", "YAML anchor '&a0'"]
        ),
        "pretrain: --set name=../../x": lambda: Case(
            pre("name=../../x"), ["'name'", "'../../x'", "plain directory name"], after=_absent(new)
        ),
        "pretrain: data.image_size=100000": lambda: Case(
            pre("data.image_size=100000"), ["'data.image_size'", "100000", "8..4096"], after=_absent(new)
        ),
        "pretrain: npz images of size 0": lambda: Case(
            pre(f"data.train={zero_npz()}"), ["zero_size.npz", "0x0 pixels"], after=_absent(new / "config.yaml")
        ),
        "pretrain: data.train a link to /dev/zero": lambda: Case(
            pre(f"data.train={linked('zero.npz', '/dev/zero')}"), ["zero.npz", "character device"]
        ),
        "eval knn: --weights /dev/zero": lambda: Case(
            _knn_weights(c, new, "/dev/zero"), ["/dev/zero", "not a regular file"], after=_absent(new / "knn")
        ),
        "eval knn: --weights a link to /dev/zero": lambda: Case(
            _knn_weights(c, new, linked("zero.pt", "/dev/zero")), ["zero.pt", "character device"]
        ),
        "eval knn: --weights cast to int64": lambda: Case(
            _knn_weights(c, new, str(_int64_weights(c))), ["int64.pt", "holds int64 values"], after=_absent(new / "knn")
        ),
        "eval detection: NaN box": lambda: _det_case(
            c, new, "nan_box", _set_box(0, [float("nan"), 1, 2, 3]), ["non-finite coordinate"]
        ),
        "eval detection: box outside the image": lambda: _det_case(
            c, new, "outside_box", _set_box(0, [1e6, 1, 2, 3]), ["lies outside"]
        ),
        "eval detection: category without id": lambda: _det_case(
            c, new, "cat_no_id", lambda d: d["categories"][0].pop("id"), ["categories[0] has 'id' None"]
        ),
        "eval detection: non-numeric iscrowd": lambda: _det_case(
            c, new, "iscrowd", lambda d: d["annotations"][0].update(iscrowd="yes"), ["'iscrowd' 'yes'"]
        ),
    }


# ---------------------------------------------------------------------------------------------
# issue 24 (part B): every number an option or a config takes is finite and in range


def _eval_args(c: Path, new: Path, kind: str, *extra, output: Optional[Path] = None) -> list[str]:
    tiny = str(c / "tiny.npz")
    args = ["eval", kind, "--weights", "random", "--arch", "resnet18", "--stem", "cifar", "--image-size", "16"]
    args += ["--train-data", tiny, "--test-data", tiny, "--output", str(output or new / kind), "--no-plots"]
    if kind == "knn":
        args += ["--k", "5"]
    else:
        args += ["--epochs", "1", "--cached-features", "--no-progress"]
    return args + [str(e) for e in extra]


def _issue24b_rows(c: Path, new: Path) -> dict[str, Callable[[], Case]]:
    def knn(*extra):
        return _eval_args(c, new, "knn", *extra)

    def linear(*extra):
        return _eval_args(c, new, "linear", *extra)

    def detection(*extra):
        return ["eval", "detection", "--weights", "random", "--arch", "resnet18", *_coco_args()] + [
            "--output",
            str(new / "det"),
            *extra,
        ]

    gone = _absent(new)
    return {
        "eval knn: --temperature nan": lambda: Case(knn("--temperature", "nan"), ["--temperature nan"], after=gone),
        "eval knn: --temperature inf": lambda: Case(knn("--temperature", "inf"), ["--temperature inf"], after=gone),
        "eval knn: --temperature 0.001": lambda: Case(
            knn("--temperature", "0.001"), ["--temperature 0.001", ">= 0.02"]
        ),
        "eval knn: --batch-size 0": lambda: Case(knn("--batch-size", "0"), ["--batch-size 0", ">= 1"], after=gone),
        "eval knn: --batch-size -1": lambda: Case(knn("--batch-size", "-1"), ["--batch-size -1"], after=gone),
        "eval knn: --workers -1": lambda: Case(knn("--workers", "-1"), ["--workers -1", ">= 0"], after=gone),
        "eval linear: --lr nan": lambda: Case(linear("--lr", "nan"), ["--lr nan", "finite"], after=gone),
        "eval linear: --lr inf": lambda: Case(linear("--lr", "inf"), ["--lr inf"], after=gone),
        "eval linear: --weight-decay -1": lambda: Case(
            linear("--weight-decay", "-1"), ["--weight-decay -1"], after=gone
        ),
        "eval linear: --weight-decay nan": lambda: Case(linear("--weight-decay", "nan"), ["--weight-decay nan"]),
        "eval linear: --workers -1": lambda: Case(linear("--workers", "-1"), ["--workers -1"], after=gone),
        "eval detection: --set solver.momentum=nan": lambda: Case(
            detection("--set", "solver.momentum=.nan"), ["'solver.momentum'", "nan", "finite"], after=gone
        ),
        "eval detection: --set test.score_thresh=2": lambda: Case(
            detection("--set", "test.score_thresh=2"), ["'test.score_thresh'", "2"], after=gone
        ),
        "eval detection: --machine-rank 3 of 1": lambda: Case(
            detection("--engine", "detectron2", "--machine-rank", "3"), ["--machine-rank 3", "<= 0"], after=gone
        ),
        "serve: --port 70000": lambda: Case(
            ["serve", "--index", str(new / "none"), "--port", "70000"], ["--port 70000", "<= 65535"]
        ),
        # --- two evaluations into one --output at once: the second is refused, the first one's files kept
        "eval knn: --output in use by another evaluation": lambda: _busy_output_case(new, knn()),
        "eval linear: --output in use by another evaluation": lambda: _busy_output_case(new, linear()),
        # --- a full disk (ulimit -f): one line naming the file, no traceback (TensorBoard's thread included)
        "eval knn: disk full while saving features": lambda: Case(
            knn(), [str(new / "knn" / "features" / "train" / "features.npy")], subprocess_limit_fsize=50_000
        ),
        "eval linear: disk full while appending metrics.jsonl": lambda: Case(
            linear(), [str(new / "linear" / "metrics.jsonl"), "File too large"], subprocess_limit_fsize=100
        ),
        "eval linear: disk full in TensorBoard's writer thread": lambda: _tensorboard_full_case(new, linear()),
        # --- an encoder whose output is not finite: refused instead of a NaN index
        "eval knn: backbone output overflows to inf/NaN": lambda: Case(
            _knn_weights(c, new, str(_overflowing_backbone(c))),
            ["not finite", "tiny.npz"],
            after=_absent(new / "knn" / "results.json", new / "knn" / "features"),
        ),
        "embed: ONNX encoder output NaN/inf": lambda: Case(
            [
                "embed",
                "--model",
                str(hostile.onnx_encoder(_issue24_dir(c) / "nan.onnx", nan=True)),
                "--data",
                str(c / "tiny.npz"),
                "--output",
                str(new / "emb"),
                "--no-progress",
            ],
            [str(_issue24_dir(c) / "nan.onnx"), "not finite"],
            after=_absent(new / "emb" / "embed.json"),
        ),
        # --- a newcomer's edges: --output named and checked first, no silent overwrite, the data before old results
        "eval linear: --output under a file": lambda: Case(
            _eval_args(c, new, "linear", output=c / "a_file" / "lin"),
            ["--output", str(c / "a_file"), "not a directory"],
        ),
        "eval detection: --output under a file": lambda: Case(
            detection()[:-2] + ["--output", str(c / "a_file" / "det")],
            ["--output", str(c / "a_file"), "not a directory"],
        ),
        "export onnx: --output exists, no --overwrite": lambda: _existing_onnx_case(c, new),
        "eval knn: a missing dataset is not hidden by earlier results": lambda: _earlier_results_case(new, knn()),
        "export onnx: disk full while writing the model": lambda: Case(
            ["export", "onnx", "--weights", str(c / "run"), "--output", str(new / "m.onnx")]
            + ["--parity-data", str(c / "tiny.npz")],
            [str(new / "m.onnx"), "File too large"],
            subprocess_limit_fsize=1_000_000,
            after=_absent(new / "m.onnx", new / "m.export.json"),
        ),
    }


def _embed_args(c: Path, out: Path, *extra) -> list[str]:
    return [
        "embed",
        "--model",
        str(_encoder(c)),
        "--data",
        str(c / "tiny.npz"),
        "--output",
        str(out),
        "--no-progress",
    ] + [*extra]


def _files_dir(c: Path) -> Path:
    """An --output holding an earlier embedding without shards (the files search reads) and a file of the user's."""
    d = c / "copies" / "emb-files"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    (d / "embeddings.npy").write_bytes(b"an earlier run's")
    (d / "notes.txt").write_text("mine\n")
    return d


def _rewrite_shards(d: Path) -> None:
    """As a later embed run redoing a shard leaves the directory: its last shard gone from an incomplete manifest,
    the index and embed.json still of the finished run."""
    m = json.loads((d / "manifest.json").read_text())
    m["shards"], m["complete"] = m["shards"][:-1], False
    (d / "manifest.json").write_text(json.dumps(m))


def _count_another_run(d: Path) -> None:
    e = json.loads((d / "embed.json").read_text())
    e["count"] += 7
    (d / "embed.json").write_text(json.dumps(e))


def _issue24_embed_rows(c: Path, new: Path) -> dict[str, Callable[[], Case]]:
    """Issue 24's embedding-directory cases (its last line, once issue 21's shards landed) and its embed / search
    items: no silent overwrite, the options named and checked first, a directory being written or mixing two runs
    refused by search."""

    def search(d: Path, *extra) -> list[str]:
        return ["search", "--index", str(d), "--query", str(c / "folder" / "a" / "0.png"), "--k", "3", *extra]

    def emb(name: str, mutate=lambda d: None) -> Path:
        return _emb_copy(c, name, mutate)

    return {
        "embed: --output holds files, no --resume/--overwrite": lambda: Case(
            _embed_args(c, _files_dir(c)),
            [f"--output {c / 'copies' / 'emb-files'} is not empty", "--overwrite"],
            watch=c / "copies" / "emb-files",
        ),
        "embed: --output holds a finished embedding, no --resume/--overwrite": lambda: Case(
            _embed_args(c, emb("emb-again")),
            [str(c / "copies" / "emb-again"), "already holds embedding shards", "--resume", "--overwrite"],
            watch=c / "copies" / "emb-again",
        ),
        "embed: --batch-size 0": lambda: Case(
            _embed_args(c, new / "emb", "--batch-size", "0"), ["--batch-size 0", ">= 1"], after=_absent(new / "emb")
        ),
        "embed: --output under a file": lambda: Case(
            _embed_args(c, c / "a_file" / "emb"), ["--output", str(c / "a_file"), "not a directory"]
        ),
        "search: --output under a file": lambda: Case(
            search(emb("emb-search-out"), "--output", str(c / "a_file" / "s.json")),
            ["--output", str(c / "a_file"), "not a directory"],
            watch=c / "copies" / "emb-search-out",
        ),
        "embed --resume: the directory's lock held by another embed": lambda: Case(
            _embed_args(c, emb("emb-locked"), "--resume"),
            [str(c / "copies" / "emb-locked"), "another embedding run is writing to this directory"],
            watch=c / "copies" / "emb-locked",
            hold_lock=True,
        ),
        "search: another embed holds the directory's lock": lambda: Case(
            search(emb("emb-search-locked")),
            [str(c / "copies" / "emb-search-locked"), "is writing to this directory", "two runs"],
            watch=c / "copies" / "emb-search-locked",
            hold_lock=True,
        ),
        "search: shards rewritten after the index was built": lambda: Case(
            search(emb("emb-rewritten", _rewrite_shards)),
            [str(c / "copies" / "emb-rewritten" / "manifest.json"), "incomplete", "two runs", "--resume"],
            watch=c / "copies" / "emb-rewritten",
        ),
        "search: embed.json of another run than ids.json": lambda: Case(
            search(emb("emb-mixed", _count_another_run)),
            ["embed.json counts 55 embeddings but ids.json lists 48", "two runs"],
            watch=c / "copies" / "emb-mixed",
        ),
    }


ISSUE24_EMBED_IDS = list(_issue24_embed_rows(Path("/nonexistent"), Path("/nonexistent")).keys())


def test_table_covers_issue_24_embedding_directories():
    """Issue 24's embed / search items and its embedding-directory cases (docs/reliability.md)."""
    assert len(ISSUE24_EMBED_IDS) >= 9 and set(ISSUE24_EMBED_IDS) <= set(ROW_IDS)


def _overflowing_backbone(c: Path) -> Path:
    """Finite weights whose output is not: every convolution x 1e6 (20 in a row overflow float32)."""
    p = _issue24_dir(c) / "overflow.pt"
    bb = torch.load(c / "run" / "backbone.pt", weights_only=True)
    bb["state_dict"] = {k: v * 1e6 if v.ndim == 4 else v for k, v in bb["state_dict"].items()}
    torch.save(bb, p)
    return p


def _existing_onnx_case(c: Path, new: Path) -> Case:
    new.mkdir(parents=True)
    (new / "m.onnx").write_bytes(b"an earlier model")
    args = ["export", "onnx", "--weights", str(c / "run"), "--output", str(new / "m.onnx")]
    return Case(args, ["--output", str(new / "m.onnx"), "exists", "--overwrite"], watch=new)


def _earlier_results_case(new: Path, args: list[str]) -> Case:
    out = Path(args[args.index("--output") + 1])
    out.mkdir(parents=True)
    (out / "results.json").write_text("{}\n")
    i = args.index("--train-data")
    args = args[: i + 1] + ["cifar10:train"] + args[i + 2 :] + ["--data-root", str(new / "no-data")]
    return Case(args, ["--train-data cifar10:train", "not found under", "--download"], watch=out)


def _busy_output_case(new: Path, args: list[str]) -> Case:
    out = Path(args[args.index("--output") + 1])
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("the other evaluation's\n")
    return Case(args, [str(out), "another simsiam-kit run is using this directory"], watch=out, hold_lock=True)


def _tensorboard_full_case(new: Path, args: list[str]) -> Case:
    pytest.importorskip("tensorboard")
    return Case(
        args,
        [f"cannot write TensorBoard events in {new / 'linear' / 'tensorboard'}", "File too large"],
        subprocess_limit_fsize=300,
    )


ISSUE24B_IDS = list(_issue24b_rows(Path("/nonexistent"), Path("/nonexistent")).keys())


def test_table_covers_issue_24_part_b():
    """Issue 24, part B (docs/reliability.md): numbers of options and configs."""
    assert len(ISSUE24B_IDS) >= 27 and set(ISSUE24B_IDS) <= set(ROW_IDS)


def _resume_case(c: Path, name: str, mutate, extra_sets, needles) -> Case:
    run = _copy_run(c, name)
    _poison_checkpoint(run, mutate)
    return Case(["pretrain", "--output", str(run), "--resume"] + sets(_tiny(c) + extra_sets), needles, watch=run)


def _nonempty_case(c: Path) -> Case:
    d = c / "copies" / "nonempty"
    d.mkdir(parents=True, exist_ok=True)
    (d / "notes.txt").write_text("mine\n")
    (d / "metrics.jsonl").write_text('{"type": "epoch", "epoch": 1}\n')  # a pruned run: no checkpoint left
    return Case(["pretrain", "--output", str(d)] + sets(_tiny(c)), [str(d), "not empty", "--overwrite"], watch=d)


def _disk_full_case(c: Path) -> Case:
    """Resume a finished run for one more epoch with files limited to 60 MB: backbone.pt (45 MB) fits,
    last.pt (90 MB) does not: one line naming last.pt; the epoch-1 checkpoint still loads."""
    run = _copy_run(c, "disk-full")
    return Case(
        ["pretrain", "--output", str(run), "--resume"] + sets(_tiny(c) + ["optim.epochs=2"]),
        ["last.pt", "File too large", "unchanged"],
        watch=run,
        may_change=("backbone.pt", "metrics.jsonl", "config.amendments.yaml"),
        subprocess_limit_fsize=60 * 2**20,
        after=_checkpoint_epoch(run, 1),
    )


ROW_IDS = list(_rows(Path("/nonexistent"), Path("/nonexistent")).keys())


def _snapshot(d: Optional[Path]) -> dict:
    if d is None or not d.is_dir():
        return {}
    return {
        str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
        for p in d.rglob("*")
        if p.is_file() and p.name != ".lock"
    }


def _invoke(case: Case) -> tuple[int, str]:
    if case.subprocess_limit_fsize is None:
        r = runner.invoke(app, case.args)
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        return r.exit_code, r.stderr
    limit = case.subprocess_limit_fsize

    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **case.env)
    r = subprocess.run(
        [sys.executable, "-m", "simsiam_kit", *case.args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        timeout=600,
    )
    return r.returncode, r.stderr


@pytest.mark.parametrize("row", ROW_IDS)
def test_bad_input(row, ctx, tmp_path):
    case = _rows(ctx, tmp_path / "new")[row]()
    before = _snapshot(case.watch)
    lock = None
    if case.hold_lock:
        lock = open(case.watch / ".lock", "a")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        code, err = _invoke(case)
    finally:
        if lock is not None:
            lock.close()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-3000:])
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in case.needles:
        assert n in lines[0], (n, lines[0])
    after = _snapshot(case.watch)
    for f, meta in before.items():
        assert f in after, f"{f} lost"
        if f not in case.may_change:
            assert after[f] == meta, f"{f} changed"
    if case.after is not None:
        case.after()


PART_B_IDS = list(_hostile_rows(Path("/nonexistent"), Path("/nonexistent")).keys())


def test_table_covers_part_a():
    """The figure docs/reliability.md states."""
    assert len(ROW_IDS) - len(PART_B_IDS) - len(ISSUE24_IDS) - len(ISSUE24B_IDS) - len(ISSUE24_EMBED_IDS) >= 40


ISSUE24_IDS = list(_issue24_rows(Path("/nonexistent"), Path("/nonexistent")).keys())


def test_table_covers_issue_24():
    """Issue 24, part A (docs/reliability.md): links and special files, --set bombs, weights, annotations."""
    assert len(ISSUE24_IDS) >= 14 and set(ISSUE24_IDS) <= set(ROW_IDS)


def test_table_covers_part_b():
    """Hostile files (docs/reliability.md, "Untrusted files"): all in the table."""
    assert len(PART_B_IDS) >= 30 and set(PART_B_IDS) <= set(ROW_IDS)


# ---------------------------------------------------------------------------------------------
# issue 24 (part B): what is left out is said, not silent


def test_eval_knn_skip_bad_images_counts_and_names_what_it_skipped(ctx, tmp_path):
    folder = str(ctx / "folder")  # 16 PNGs, b/3.png truncated
    args = ["eval", "knn", "--weights", "random", "--arch", "resnet18", "--stem", "cifar", "--image-size", "16"]
    args += ["--train-data", folder, "--test-data", folder, "--k", "5", "--no-plots", "--skip-bad-images"]
    r = runner.invoke(app, args + ["--output", str(tmp_path / "knn")])
    assert r.exit_code == 0, r.output
    assert "--skip-bad-images: skipped 2 unreadable images (train 1, test 1; first: b/3.png)" in r.stdout, r.stdout
    res = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert res["skipped_images"] == {
        "train": {"count": 1, "ids": ["b/3.png"]},
        "test": {"count": 1, "ids": ["b/3.png"]},
    }
    assert res["settings"]["bank_size"] == 15 and res["settings"]["queries"] == 15


def test_knn_monitor_that_cannot_run_says_why_at_start(ctx, tmp_path):
    """Unlabelled val data (labels -1) used to turn the kNN monitor off without a word."""
    unlabelled = tmp_path / "unlabelled.npz"
    with np.load(ctx / "tiny.npz") as z:
        np.savez(unlabelled, images=z["images"], labels=np.full(len(z["labels"]), -1, np.int64))
    overrides = _tiny(ctx) + [f"data.val={unlabelled}", "train.max_steps_per_epoch=1"]
    r = runner.invoke(app, ["pretrain", "--output", str(tmp_path / "run")] + sets(overrides))
    assert r.exit_code == 0, r.output
    note = f"note: the kNN monitor is off: data.val ({unlabelled}) has images without labels (-1)"
    assert note in r.stdout, r.stdout
    assert "knn_top1" not in json.loads((tmp_path / "run" / "results" / "pretrain.json").read_text())


# ---------------------------------------------------------------------------------------------
# issue 24 (part B): a missing extra is found before the work that needs it, not after


def _fail(what: str):
    def fail(*a, **k):
        raise AssertionError(f"{what} ran before the missing extra was reported")

    return fail


def test_eval_knn_without_faiss_stops_before_extracting_features(ctx, tmp_path, monkeypatch):
    import simsiam_kit.features

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    monkeypatch.setattr(simsiam_kit.features, "extract_features", _fail("feature extraction"))
    r = runner.invoke(app, _eval_args(ctx, tmp_path, "knn", "--backend", "faiss"))
    assert r.exit_code == 2, (r.output, repr(r.exception))
    assert r.stderr.startswith("error: 'faiss' is not installed") and "pip install" in r.stderr, r.stderr
    assert not (tmp_path / "knn").exists()


def test_export_onnx_without_onnxruntime_stops_before_exporting(ctx, tmp_path, monkeypatch):
    import simsiam_kit.export.onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(simsiam_kit.export.onnx, "load_encoder", _fail("the export"))
    r = runner.invoke(app, ["export", "onnx", "--weights", str(ctx / "run"), "--output", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2, (r.output, repr(r.exception))
    assert r.stderr.startswith("error: 'onnxruntime' is not installed"), r.stderr
    assert not (tmp_path / "m.onnx").exists()
