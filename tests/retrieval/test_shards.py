"""The shard format (simsiam_kit/retrieval/shards.py): round trip, checksums, resume rules, the lock, memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from simsiam_kit.errors import UserError
from simsiam_kit.retrieval.shards import (
    COLUMNS,
    MANIFEST_NAME,
    ShardWriter,
    iter_shards,
    read_manifest,
    shard_range,
)


def _rows(start: int, n: int, dim: int = 4):
    rng = np.random.default_rng(start)
    z = rng.standard_normal((n, dim)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    cols = {
        "row": np.arange(start, start + n),
        "id": [f"img{start + i}.jpg" for i in range(n)],
        "label": np.full(n, -1),
        "width": np.full(n, 32),
        "height": np.full(n, 24),
    }
    return z, cols


def _write_all(out, total=10, size=4, dtype="float32", **kw):
    w = ShardWriter(out, dim=4, dtype=dtype, shard_size=size, fingerprint={"model_sha256": "abc"}, total=total, **kw)
    for i in w.todo():
        a, b = shard_range(i, size, total)
        z, cols = _rows(a, b - a)
        w.write_shard(i, z, cols, inputs=b - a)
    w.close()
    return w


def test_round_trip_layout_and_manifest(tmp_path):
    _write_all(tmp_path / "e", total=10, size=4)
    m = read_manifest(tmp_path / "e")
    assert m["complete"] and m["total"] == 10
    assert [(s.index, s.first_row, s.rows, s.name) for s in m["shards"]] == [
        (0, 0, 4, "00000"),
        (1, 4, 4, "00001"),
        (2, 8, 2, "00002"),
    ]
    assert sorted(p.name for p in (tmp_path / "e" / "shards").iterdir()) == [
        f"0000{i}.{ext}" for i in range(3) for ext in ("npy", "parquet")
    ]
    got = list(iter_shards(tmp_path / "e"))
    z = np.concatenate([g[1] for g in got])
    want = np.concatenate([_rows(0, 4)[0], _rows(4, 4)[0], _rows(8, 2)[0]])
    assert z.dtype == np.float32 and np.array_equal(z, want)
    t = got[2][2]
    assert t.column_names == list(COLUMNS)
    assert t.column("row").to_pylist() == [8, 9]
    assert t.column("offset").to_pylist() == [0, 1]
    assert t.column("id").to_pylist() == ["img8.jpg", "img9.jpg"]
    assert t.column("width").to_pylist() == [32, 32] and t.column("height").to_pylist() == [24, 24]


def test_float16_shards(tmp_path):
    _write_all(tmp_path / "e", dtype="float16")
    z = next(iter_shards(tmp_path / "e"))[1]
    assert z.dtype == np.float16
    assert np.allclose(z, _rows(0, 4)[0], atol=1e-3)


def test_second_writer_refused_and_lock_released(tmp_path):
    w = ShardWriter(tmp_path / "e", dim=4, shard_size=4, total=8)
    with pytest.raises(UserError, match="another embedding run is writing"):
        ShardWriter(tmp_path / "e", dim=4, shard_size=4, total=8, resume=True)
    w.close()
    ShardWriter(tmp_path / "e", dim=4, shard_size=4, total=8, resume=True).close()


def test_lock_refuses_a_symlink(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "elsewhere").write_text("x")
    (tmp_path / "e" / ".lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=r"\.lock: a symbolic link; a writer's lock file must be a regular file"):
        ShardWriter(tmp_path / "e", dim=4, shard_size=4)
    assert (tmp_path / "elsewhere").read_text() == "x"


def test_existing_directory_needs_resume(tmp_path):
    _write_all(tmp_path / "e")
    with pytest.raises(UserError, match="--resume"):
        ShardWriter(tmp_path / "e", dim=4, shard_size=4, total=10, fingerprint={"model_sha256": "abc"})


def test_resume_refuses_other_settings(tmp_path):
    _write_all(tmp_path / "e")
    with pytest.raises(UserError, match="different model_sha256"):
        ShardWriter(tmp_path / "e", dim=4, shard_size=4, total=10, fingerprint={"model_sha256": "xyz"}, resume=True)
    with pytest.raises(UserError, match="shard size 4"):
        ShardWriter(tmp_path / "e", dim=4, shard_size=5, total=10, fingerprint={"model_sha256": "abc"}, resume=True)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shard_detected_and_redone(tmp_path, damage):
    out = tmp_path / "e"
    _write_all(out)
    before = [z.copy() for _, z, _ in iter_shards(out)]
    f = out / "shards" / "00001.npy"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-5])
    elif damage == "flip":
        b = bytearray(f.read_bytes())
        b[-1] ^= 0x01
        f.write_bytes(bytes(b))
    else:
        f.unlink()
    with pytest.raises(UserError, match="corrupt shard 00001"):
        list(iter_shards(out))
    w = ShardWriter(out, dim=4, shard_size=4, total=10, fingerprint={"model_sha256": "abc"}, resume=True)
    assert w.todo() == [1] and len(w.dropped) == 1 and "00001.npy" in w.dropped[0]
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"] is False
    z, cols = _rows(4, 4)
    w.write_shard(1, z, cols, inputs=4)
    w.close()
    after = [z for _, z, _ in iter_shards(out)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert read_manifest(out)["complete"]


def test_unlisted_files_are_not_shards(tmp_path):
    out = tmp_path / "e"
    w = ShardWriter(out, dim=4, shard_size=4, total=8)
    (out / "shards").mkdir()
    (out / "shards" / "00000.npy").write_bytes(b"half a shard")
    (out / "shards" / ".00001.npy.abcd1234.tmp").write_bytes(b"killed write")
    w.close()
    w = ShardWriter(out, dim=4, shard_size=4, total=8, resume=True)
    assert w.todo() == [0, 1]
    assert not (out / "shards" / ".00001.npy.abcd1234.tmp").exists()  # stale temp files removed under the lock
    w.close()


def test_writer_memory_is_bounded_by_one_shard(tmp_path):
    """Peak traced allocation while writing 200 shards exceeds that of 20 by the manifest entries only (about
    1 KB per shard, held as a dict and once as JSON text): the rows and their encoded bytes are freed after
    each shard. Kept, 180 more shards of 64 KB would add 11.5 MB."""
    dim, size = 64, 256

    def peak(n_shards: int, out) -> int:
        w = ShardWriter(out, dim=dim, shard_size=size, total=n_shards * size)
        z = np.ones((size, dim), np.float32) / 8.0
        tracemalloc.start()
        for i in w.todo():
            cols = {
                "row": np.arange(i * size, (i + 1) * size),
                "id": [str(r) for r in range(size)],
                "label": np.zeros(size, np.int64),
                "width": np.ones(size),
                "height": np.ones(size),
            }
            w.write_shard(i, z, cols, inputs=size)
        got = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        w.close()
        return got

    small, large = peak(20, tmp_path / "a"), peak(200, tmp_path / "b")
    shard_bytes = size * dim * 4
    assert large - small < 180 * 2000, (small, large)
    assert large < 8 * shard_bytes + 200 * 2000 + 1_000_000
