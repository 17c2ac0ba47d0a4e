"""`simsiam-kit embed` at the command line: shards, --resume, the options' checks, bad images named with the
command's option, the torch runtime against the exported model, then `search` on the result."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from helpers import DATA, REPO, cli, conv_onnx_encoder, need


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return conv_onnx_encoder(tmp_path_factory.mktemp("enc") / "conv.onnx", size=8, dim=8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos") / "flat"
    root.mkdir()
    for f in sorted(need(DATA / "coco128_det" / "images").glob("*.jpg"))[:10]:
        shutil.copy(f, root / f.name)
    return root


def _embed(encoder, data, out, *extra):
    return cli(
        "embed", "--model", encoder, "--data", data, "--output", out, "--shard-size", 4, "--batch-size", 4,
        "--workers", 0, "--no-progress", *extra,
    )  # fmt: skip


def test_embed_resume_and_search(encoder, photos, tmp_path):
    out = tmp_path / "e"
    r = _embed(encoder, photos, out)
    assert r.exit_code == 0, r.output
    assert "3 shard(s) of 4 to write" in r.output and "wrote 10 embeddings in 3 shard(s)" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and [s["rows"] for s in m["shards"]] == [4, 4, 2]
    r = _embed(encoder, photos, out)  # again, without --resume: refused, nothing changed
    assert r.exit_code == 2 and "already holds embedding shards" in r.output and "--resume" in r.output
    before = (out / "shards" / "00001.npy").read_bytes()
    (out / "shards" / "00001.npy").unlink()
    r = _embed(encoder, photos, out, "--resume")
    assert r.exit_code == 0, r.output
    assert "redoing a shard" in r.output and "1 shard(s) of 4 to write, 2 kept from the previous run" in r.output
    assert (out / "shards" / "00001.npy").read_bytes() == before
    q = next(photos.iterdir())
    r = cli("search", "--index", out, "--query", q, "--k", 2)
    assert r.exit_code == 0, r.output
    first = json.loads((out / "search.json").read_text())["results"][0]["neighbours"][0]
    assert first["id"] == q.name and first["score"] > 0.9999


def test_option_checks(encoder, photos, tmp_path):
    cases = [
        (("--dtype", "float8"), "--dtype float8: expected float16 or float32"),
        (("--shard-size", 0), "--shard-size must be >= 1"),
        (("--workers", -1), "--workers must be >= 0"),
        (("--batch-size", 0), "--batch-size 0: expected an integer >= 1"),  # issue 24: named the option only in part
        (("--runtime", "tvm"), "--runtime tvm: unknown (available: auto, ort-int8, torch-bf16, ort-fp32, torch)"),
        (("--weights", "random"), "give --model FILE.onnx or --weights RUN (--runtime torch), not both"),
        (("--runtime", "torch"), "--runtime torch needs --weights"),
    ]
    for extra, msg in cases:
        r = _embed(encoder, photos, tmp_path / "e", *extra)
        assert r.exit_code == 2 and msg in r.output, (extra, r.output)
    r = cli("embed", "--data", photos, "--output", tmp_path / "e")
    assert r.exit_code == 2 and "--model FILE.onnx is needed" in r.output
    r = cli("embed", "--runtime", "torch", "--data", photos, "--output", tmp_path / "e")
    assert r.exit_code == 2 and "--runtime torch needs --weights" in r.output


def test_corrupt_image_in_a_tar_names_the_option(encoder, photos, tmp_path):
    files = sorted(photos.iterdir())[:3]
    with tarfile.open(tmp_path / "00000.tar", "w") as tf:
        for k, f in enumerate(files):
            data = b"broken" if k == 1 else f.read_bytes()
            ti = tarfile.TarInfo(f"{k:05d}.jpg")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    spec = str(tmp_path / "{00000..00000}.tar")
    r = _embed(encoder, spec, tmp_path / "strict")
    assert r.exit_code == 2
    assert "00000.tar::00001" in r.output and "(--skip-bad-images skips unreadable images)" in r.output
    r = _embed(encoder, spec, tmp_path / "skip", "--skip-bad-images")
    assert r.exit_code == 0, r.output
    assert "skipped 1 unreadable image(s)" in r.output
    assert json.loads((tmp_path / "skip" / "embed.json").read_text())["skipped"] == 1


def test_torch_runtime_matches_the_exported_model(tiny_run, shared_tiny_npz, tmp_path):
    from simsiam_kit.utils.device import cpu_supports_bf16

    onnx = tmp_path / "enc.onnx"
    r = cli("export", "onnx", "--weights", tiny_run, "--output", onnx)
    assert r.exit_code == 0, r.output
    common = ("--data", shared_tiny_npz, "--shard-size", 16, "--workers", 0, "--no-progress")
    r = cli("embed", "--model", onnx, "--output", tmp_path / "onnx", *common)
    assert r.exit_code == 0, r.output
    r = cli("embed", "--runtime", "torch", "--weights", tiny_run, "--output", tmp_path / "torch", *common)
    assert r.exit_code == 0, r.output
    a, b = np.load(tmp_path / "onnx" / "embeddings.npy"), np.load(tmp_path / "torch" / "embeddings.npy")
    tol = 3e-2 if cpu_supports_bf16() else 1e-4  # bf16 autocast where the CPU has it
    assert a.shape == b.shape == (48, a.shape[1]) and np.abs(a - b).max() < tol
    assert json.loads((tmp_path / "torch" / "embed.json").read_text())["runtime"].startswith("torch-")


def test_output_that_holds_files_needs_resume_or_overwrite(encoder, photos, tmp_path):
    """Issue 24: `embed` wrote over an --output holding an earlier embedding without shards, or the user's own
    files. Refused before the model loads, naming --output; --overwrite removes embed's own files only."""
    out = tmp_path / "e"
    out.mkdir()
    (out / "embeddings.npy").write_bytes(b"an earlier run's")
    (out / "notes.txt").write_text("mine\n")
    r = _embed(encoder, photos, out)
    assert r.exit_code == 2, r.output
    assert f"--output {out} is not empty (embeddings.npy, notes.txt); --overwrite replaces" in r.output
    assert "runtime:" not in r.output and "embedding 10 images" not in r.output  # before any work
    assert (out / "embeddings.npy").read_bytes() == b"an earlier run's"
    r = _embed(encoder, photos, out, "--resume", "--overwrite")
    assert r.exit_code == 2 and "give one of them" in r.output
    r = _embed(encoder, photos, out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "mine\n" and np.load(out / "embeddings.npy").shape == (10, 8)
    # a finished run (3 shards of 4), again: refused naming both ways out; --overwrite with shards of 5 replaces
    # it whole (no shard of the earlier run left behind)
    r = _embed(encoder, photos, out)
    assert r.exit_code == 2 and "already holds embedding shards" in r.output and "--overwrite" in r.output
    r = cli(
        "embed", "--model", encoder, "--data", photos, "--output", out, "--shard-size", 5, "--batch-size", 5,
        "--workers", 0, "--no-progress", "--overwrite",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [s["rows"] for s in json.loads((out / "manifest.json").read_text())["shards"]] == [5, 5]
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "00000.npy", "00000.parquet", "00001.npy", "00001.parquet",
    ]  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine\n"


def test_output_is_checked_before_any_work(encoder, photos, tmp_path):
    """Issue 24: --output errors that did not name --output, or came after the work (search's after the search)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    r = _embed(encoder, photos, a_file / "e")
    assert r.exit_code == 2 and f"--output {a_file / 'e'}: {a_file} is not a directory" in r.output, r.output
    out = tmp_path / "e"
    assert _embed(encoder, photos, out).exit_code == 0
    q = next(photos.iterdir())
    r = cli("search", "--index", out, "--query", q, "--output", a_file / "s.json")
    assert r.exit_code == 2 and f"--output {a_file / 's.json'}: {a_file} is not a directory" in r.output, r.output
    assert "onnxruntime provider" not in r.output  # refused before the search


def test_every_index_kind_the_help_lists_is_accepted(encoder, photos, tmp_path):
    """Issue 24: `embed --index` listed bf16, which needed --backend torch and which the README did not list.
    Each kind the help names builds (its backend by default), and the README's synopsis lists the same."""
    from simsiam_kit.cli.embed import INDEX_HELP
    from simsiam_kit.retrieval.index import KINDS

    listed = [k for k in (*KINDS, "none") if re.search(rf"\b{k}\b", INDEX_HELP)]
    assert listed == ["flat", "bf16", "ivf", "hnsw", "none"]
    for kind in listed:
        r = _embed(encoder, photos, tmp_path / kind, "--index", kind)
        assert r.exit_code == 0, (kind, r.output)
        index = json.loads((tmp_path / kind / "embed.json").read_text())["index"]
        assert (index or {}).get("kind") == (None if kind == "none" else kind)
    synopsis = next(
        line for line in (REPO / "README.md").read_text().splitlines() if "simsiam-kit embed  --model FILE" in line
    )
    assert set(re.search(r"--index ([a-z0-9|]+)", synopsis).group(1).split("|")) == set(listed)


def test_a_small_encoder_given_photos_is_warned_about(encoder, photos, tmp_path):
    from simsiam_kit.retrieval.embed_search import scale_warning

    from helpers import write_tiny_npz

    # the rule: an encoder of <= 32 px, images whose median shorter side is >= 4x its size
    assert scale_warning(16, [480, 500, 640]) is not None and "about 500 px" in scale_warning(16, [480, 500, 640])
    assert scale_warning(16, [40, 60, 70]) is None  # 60 < 4 x 16
    assert scale_warning(224, [640, 640]) is None and scale_warning(None, [640]) is None
    assert scale_warning(16, []) is None
    out = tmp_path / "e"
    r = _embed(encoder, photos, out)  # the 8 px test encoder on the coco128 photos (shorter sides 300-640 px)
    assert r.exit_code == 0, r.output
    assert "warning: this encoder takes 8 px images and these are about" in r.output
    r = cli("search", "--index", out, "--query", next(photos.iterdir()), "--k", 2)
    assert r.exit_code == 0 and "warning: this encoder takes 8 px images" in r.output
    npz = write_tiny_npz(tmp_path / "small.npz", n=12, size=16)  # 16 px images, 2x the encoder: no warning
    r = _embed(encoder, npz, tmp_path / "small")
    assert r.exit_code == 0, r.output
    assert "warning: this encoder" not in r.output
