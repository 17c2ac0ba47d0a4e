"""``--index auto``: exact or bf16 by measured recall and speed, the timing cached per machine."""

from __future__ import annotations

import json

import torch

from simsiam_kit.retrieval.index_choice import choose_index_kind


def _cone(n, q, d=64, spread=0.05, seed=0):
    """A bank of n and q queries: unit vectors around one direction (spread 0.05: similarities 0.998-0.9999)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g)
    x = torch.nn.functional.normalize(mu + spread * torch.randn(n + q, d, generator=g), dim=1)
    return x[:n], x[n:]


def test_low_bf16_recall_chooses_the_exact_search_without_timing(tmp_path):
    # a narrow cone (similarities 0.998-0.9999) and no re-scoring: bf16 loses true neighbours (< 0.99)
    bank, q = _cone(2000, 300)
    c = choose_index_kind(bank, q, 20, rerank=0, probe=64, cache=tmp_path / "c.json")
    assert c["kind"] == "flat" and c["how"] == "recall" and c["recall_at_k"] < 0.99 and c["probe_queries"] == 64
    assert "of the exact 20 neighbours on 64 queries" in c["reason"] and not (tmp_path / "c.json").exists()


def test_good_recall_is_timed_then_cached(tmp_path):
    bank, q = _cone(3000, 200, spread=1.0)  # well spread: bf16 + rerank finds them
    cache = tmp_path / "c.json"
    first = choose_index_kind(bank, q, 10, rerank=16, probe=50, cache=cache)
    assert first["recall_at_k"] >= 0.99 and first["how"] == "measured" and first["kind"] in ("flat", "bf16")
    assert set(first["seconds"]) == {"flat", "bf16"}
    (entry,) = json.loads(cache.read_text())["entries"].values()
    assert entry["choice"] == first["kind"] and entry["facts"]["bank"] == [3000, 64] and entry["facts"]["k"] == 10
    again = choose_index_kind(bank, q, 10, rerank=16, probe=50, cache=cache)
    assert again["how"] == "cached" and again["kind"] == first["kind"]
    # another k is another question: measured again
    assert choose_index_kind(bank, q, 11, rerank=16, probe=50, cache=cache)["how"] == "measured"


def test_faiss_backend_has_only_the_exact_kind(tmp_path):
    c = choose_index_kind(*_cone(100, 10), 5, backend="faiss", cache=tmp_path / "c.json")
    assert (c["kind"], c["how"]) == ("flat", "only candidate")


def test_cli_knn_index_auto_records_its_choice(tmp_path, shared_tiny_npz):
    from helpers import cli

    out = tmp_path / "knn"
    tiny = str(shared_tiny_npz)
    r = cli("eval", "knn", "--weights", "random", "--arch", "resnet18", "--train-data", tiny, "--test-data", tiny,
            "--k", "5", "--index", "auto", "--no-plots", "--output", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "results.json").read_text())["settings"]
    choice = settings["index_choice"]
    assert settings["index"] == "auto" and settings["index_chosen"] == choice["kind"] in ("flat", "bf16")
    assert f"--index auto: {choice['kind']} (" in r.output and choice["probe_queries"] == 48
