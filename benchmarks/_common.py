"""Small helpers shared by the benchmark scripts: timing, tables, JSON output, machine description."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def cpu_kind(flags: dict) -> str:
    """A short name of the CPU kind a figure holds on, from the flags of :func:`cpu_record`: the columns of
    docs/benchmarks.md ("AMX (bf16 + int8 tiles)", "AVX512-BF16, no AMX", ...)."""
    if flags.get("amx_bf16") or flags.get("amx_int8"):
        tiles = [t for t, f in (("bf16", "amx_bf16"), ("int8", "amx_int8")) if flags.get(f)]
        return f"AMX ({' + '.join(tiles)} tiles)"
    if flags.get("avx512_bf16"):
        return "AVX512-BF16, no AMX" + (" (VNNI int8)" if flags.get("avx512_vnni") else "")
    if flags.get("avx512_vnni"):
        return "AVX512-VNNI, no bf16"
    return "no bf16 / int8 dot-product instructions"


def cpu_record() -> dict:
    """What every benchmark JSON records about its CPU (one rule for all scripts): the model name, the flags
    that decide the fast low-precision path (avx512_bf16, amx_bf16, amx_int8, avx512_vnni), their short
    :func:`cpu_kind`, the usable cores and the 1/5/15-minute load at the time of the call."""
    from simsiam_kit.utils.device import cpu_facts, usable_cores

    facts = cpu_facts()
    return {
        "cpu": facts["model"],
        "cpu_flags": facts["flags"],
        "cpu_kind": cpu_kind(facts["flags"]),
        "usable_cores": usable_cores(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def machine() -> dict:
    import torch

    rec = cpu_record()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        **rec,
        "cores": os.cpu_count(),
        "load_average_1min": load,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def print_table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    lines = [" | ".join(c.ljust(widths[c]) for c in cols), "-+-".join("-" * widths[c] for c in cols)]
    for r in rows:
        lines.append(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))
    text = "\n".join(lines)
    print(text)
    return text


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / name
    p.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    print(f"wrote {p}")
    return p
