"""The benchmark scripts of issue 25 at --smoke size, and the CPU record every benchmark JSON carries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import CIFAR_VAL, REPO, need

sys.path.insert(0, str(REPO / "benchmarks"))

FLAGS = {"avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni"}


def test_cpu_record_names_the_cpu_kind():
    from _common import cpu_kind, cpu_record

    rec = cpu_record()
    assert rec["cpu"] and set(rec["cpu_flags"]) == FLAGS and rec["cpu_kind"] == cpu_kind(rec["cpu_flags"])
    assert cpu_kind({"amx_bf16": True, "amx_int8": True, "avx512_bf16": True}) == "AMX (bf16 + int8 tiles)"
    assert cpu_kind({"avx512_bf16": True, "avx512_vnni": True}) == "AVX512-BF16, no AMX (VNNI int8)"
    assert cpu_kind({}) == "no bf16 / int8 dot-product instructions"


def test_knn_profile_smoke(tmp_path):
    import knn_profile

    out = tmp_path / "p.json"
    knn_profile.main(["--smoke", "--baseline", "HEAD", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert set(rep["machine"]["cpu_flags"]) == FLAGS and rep["k"] == 20
    rows = {r["row"]: r for r in rep["rows"]}
    for chunk in (64, 128):
        assert rows[f"gemm_bf16/chunk {chunk}"]["overhead_vs_gemm"] == 0.0
        s = rows[f"search/chunk {chunk}/rerank 4"]
        assert s["median_s"] > 0 and 0.9 <= s["recall_at_k"] <= 1.0 and "meets_overhead_target" in s
    assert "aten::" in rep["torch_profile"]
    # --baseline: the committed search timed alongside; the same code gives the same results
    assert rep["baseline"] == "HEAD" and rows["baseline search/chunk 64/rerank 4"]["median_s"] > 0
    assert "identical_to_baseline" not in rows["baseline search/chunk 64/rerank 4"]
    assert isinstance(rows["search/chunk 64/rerank 4"]["identical_to_baseline"], bool)


@pytest.mark.slow
def test_embed_throughput_smoke(tmp_path):
    need(CIFAR_VAL)
    out = tmp_path / "e.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "embed_throughput.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert set(rep["env"]["cpu_flags"]) == FLAGS
    (row,) = rep["results"]
    assert set(row["int8_formats"]) == {
        "ort_int8_qdq_per_tensor",
        "ort_int8_qoperator_per_channel",
        "ort_int8_qoperator_per_tensor",
    }
    assert "QLinearConv" in row["int8_formats"]["ort_int8_qoperator_per_channel"]["graph_ops"]
    assert "QLinearConv" in row["ort_profile"]["ort_int8"]  # the QDQ graph runs fused int8 convolutions
    assert "images_per_s" in row["torch_int8_pt2e"] or "skipped" in row["torch_int8_pt2e"]
