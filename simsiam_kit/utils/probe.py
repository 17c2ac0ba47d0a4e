"""Choose by measuring: the fastest of several ways to compute the same thing, from a short timed probe on
real input, remembered per machine.

:func:`choose_fastest` times each candidate (a zero-argument callable) on the caller's sample: one untimed
warm-up call each, then ``rounds`` rounds in which every candidate runs once, the order rotating each round
(so load from other processes hits every candidate alike); the candidate with the smallest median wins. The
result is cached in a small JSON file (:func:`cache_path`) under a key built from the CPU model, the CPU flags
that decide which low-precision path is fast (:data:`simsiam_kit.utils.device.CPU_FLAGS`) and the caller's own
facts (a model's sha256, a bank's shape, the candidates' names), so the probe runs once per machine and input;
a cached choice is used only while it is still among the candidates. A forced choice (``--runtime``,
``--index``) skips both.

Consumers: the embedder's runtime (``export/runtime_choice.py``: ORT int8, torch bf16 + channels_last, ORT
fp32) and the kNN index kind (``eval knn --index auto``). The cache file is written atomically; one that
cannot be read or parsed is ignored with a warning naming it (and replaced by the next probe).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

from simsiam_kit.errors import UserError

CACHE_FILE = "choices.json"
CACHE_FORMAT = "simsiam-kit-choices"
#: at most this many entries are kept (the oldest go first): a cache, not a log
MAX_ENTRIES = 256


def cache_path() -> Path:
    """``$SIMSIAM_KIT_CACHE/choices.json``, else ``$XDG_CACHE_HOME/simsiam-kit/choices.json``, else
    ``~/.cache/simsiam-kit/choices.json``."""
    root = os.environ.get("SIMSIAM_KIT_CACHE")
    if root:
        return Path(root).expanduser() / CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path("~/.cache").expanduser()
    return base / "simsiam-kit" / CACHE_FILE


def choice_key(purpose: str, facts: Mapping, cpu: Optional[Mapping] = None) -> tuple[str, dict]:
    """(key, facts the key stands for): the CPU model and flags (:func:`~simsiam_kit.utils.device.cpu_facts`,
    or ``cpu``) plus the caller's ``facts``, hashed; the facts are stored next to the choice for a reader."""
    from simsiam_kit.utils.device import cpu_facts

    c = dict(cpu_facts() if cpu is None else cpu)
    described = {"purpose": purpose, "cpu": c.get("model"), "cpu_flags": c.get("flags"), **dict(facts)}
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32], described


def _read_cache(path: Path) -> dict:
    """The cache's entries, or {} (with a warning naming the file) when it exists but is not ours or unreadable."""
    if not path.exists():
        return {}
    try:
        with open(path, "rb") as f:
            raw = f.read(4 << 20)
        obj = json.loads(raw.decode("utf-8"))
        if not (isinstance(obj, dict) and obj.get("format") == CACHE_FORMAT and isinstance(obj.get("entries"), dict)):
            raise ValueError(f"not a {CACHE_FORMAT} file")
        return {k: v for k, v in obj["entries"].items() if isinstance(v, dict) and isinstance(v.get("choice"), str)}
    except (OSError, ValueError, UnicodeDecodeError) as e:
        warnings.warn(f"{path}: ignoring the cache of measured choices ({str(e)[:200]}); probing again", stacklevel=3)
        return {}


def _write_cache(path: Path, entries: dict) -> None:
    from simsiam_kit.utils.io import atomic_write_json

    if len(entries) > MAX_ENTRIES:
        oldest = sorted(entries, key=lambda k: str(entries[k].get("measured_at", "")))
        entries = {k: entries[k] for k in oldest[-MAX_ENTRIES:]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"format": CACHE_FORMAT, "entries": entries})
    except (OSError, UserError) as e:  # a read-only home must not stop the work: the choice stands unremembered
        warnings.warn(f"{path}: cannot remember the measured choice ({str(e)[:200]})", stacklevel=3)


def time_candidates(
    fns: Mapping[str, Callable[[], object]],
    rounds: int = 2,
    warmup: int = 1,
    clock=time.perf_counter,
    pause: float = 0.0,
) -> dict[str, float]:
    """``{name: median seconds}`` of each zero-argument callable: ``warmup`` untimed calls each, then ``rounds``
    rounds with every callable once, the order rotating each round, each timed call after ``pause`` seconds
    (the worker threads of a runtime that just ran, onnxruntime's or OpenMP's, spin for a while after it and
    would slow whichever candidate runs next)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list] = {n: [] for n in names}
    for r in range(max(1, rounds)):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if pause > 0:
                time.sleep(pause)
            t = clock()
            fns[n]()
            times[n].append(clock() - t)
    return {n: statistics.median(v) for n, v in times.items()}


@dataclass
class Choice:
    """What was chosen and why: ``how`` is "measured", "cached", "forced" or "only candidate"."""

    name: str
    how: str
    seconds: dict = field(default_factory=dict)  # median seconds per candidate (measured now, or when cached)
    reason: str = ""

    def describe(self) -> str:
        return f"{self.name} ({self.reason})" if self.reason else self.name


def _reason(name: str, seconds: Mapping[str, float], how: str) -> str:
    others = sorted((s, n) for n, s in seconds.items() if n != name)
    if not others or name not in seconds:
        return how
    s, n = others[0]
    ratio = s / max(seconds[name], 1e-12)
    when = "measured now" if how == "measured" else "measured before on this machine, cached"
    return f"fastest, {ratio:.2f}x {n} ({when}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in seconds.items()) + ")"


def choose_fastest(
    fns: Mapping[str, Callable[[], object]],
    purpose: str,
    facts: Mapping,
    force: Optional[str] = None,
    rounds: int = 2,
    warmup: int = 1,
    cache: Optional[Path] = None,
    use_cache: bool = True,
    cpu: Optional[Mapping] = None,
    clock=time.perf_counter,
    pause: float = 0.0,
) -> Choice:
    """The fastest of ``fns`` (see the module docstring). ``force``: one of the names, chosen without timing
    (a name that is not a candidate is a :class:`UserError`); ``cache``: the file (default :func:`cache_path`);
    ``use_cache=False`` neither reads nor writes it."""
    if not fns:
        raise UserError(f"{purpose}: no candidate to choose from")
    names = list(fns)
    if force is not None:
        if force not in fns:
            raise UserError(f"'{force}' is not available here (available: {', '.join(names)})")
        return Choice(force, "forced", reason="forced")
    if len(names) == 1:
        return Choice(names[0], "only candidate", reason="the only candidate here")
    key, described = choice_key(purpose, {**dict(facts), "candidates": sorted(names)}, cpu)
    path = cache if cache is not None else cache_path()
    entries = _read_cache(path) if use_cache else {}
    hit = entries.get(key)
    if hit is not None and hit["choice"] in fns:
        secs = hit.get("seconds") if isinstance(hit.get("seconds"), dict) else {}
        return Choice(hit["choice"], "cached", secs, _reason(hit["choice"], secs, "cached"))
    seconds = time_candidates(fns, rounds, warmup, clock, pause)
    best = min(names, key=lambda n: seconds[n])
    if use_cache:
        entries[key] = {
            "choice": best,
            "seconds": {n: round(s, 6) for n, s in seconds.items()},
            "facts": described,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_cache(path, entries)
    return Choice(best, "measured", seconds, _reason(best, seconds, "measured"))
