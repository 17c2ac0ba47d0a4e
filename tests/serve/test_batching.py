"""Dynamic batching: requests arriving together share one call, each caller gets its own rows, the wait is
bounded, an error reaches every caller of its batch."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from simsiam_kit.serve.batching import DirectCaller, DynamicBatcher


class Recorder:
    """fn(items) -> rows [item, 2 * item]; records the size of every call."""

    def __init__(self, delay: float = 0.0):
        self.sizes, self.delay = [], delay

    def __call__(self, items):
        self.sizes.append(len(items))
        time.sleep(self.delay)
        return np.asarray([[x, 2 * x] for x in items], np.float32)


def _together(call, n: int) -> list:
    out, barrier = [None] * n, threading.Barrier(n)

    def worker(i):
        barrier.wait()
        out[i] = call([i, 100 + i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_requests_arriving_together_share_calls_and_get_their_own_rows():
    rec = Recorder(delay=0.02)  # a slow encoder: requests pile up while it runs
    b = DynamicBatcher(rec, max_wait_ms=5, max_batch=64)
    try:
        out = _together(b, 8)
    finally:
        b.close()
    for i, rows in enumerate(out):
        assert rows.tolist() == [[i, 2 * i], [100 + i, 200 + 2 * i]]
    assert sum(rec.sizes) == 16 and len(rec.sizes) < 8 and b.calls == len(rec.sizes)


def test_max_batch_bounds_a_call():
    rec = Recorder(delay=0.02)
    b = DynamicBatcher(rec, max_wait_ms=50, max_batch=4)
    try:
        _together(b, 8)
    finally:
        b.close()
    assert sum(rec.sizes) == 16 and max(rec.sizes) <= 4 + 1  # a request is never split: 2 items may top 4


def test_a_lone_request_waits_at_most_the_bound():
    b = DynamicBatcher(Recorder(), max_wait_ms=5)
    try:
        b([1])  # warm the worker
        t0 = time.perf_counter()
        assert b([3]).tolist() == [[3, 6]]
        assert time.perf_counter() - t0 < 0.5  # 5 ms wait + scheduling on a busy machine
    finally:
        b.close()


def test_an_error_reaches_every_caller_of_the_batch_and_the_batcher_goes_on():
    calls = []

    def fn(items):
        calls.append(list(items))
        if -1 in items:
            raise ValueError("bad item")
        return np.asarray([[x] for x in items], np.float32)

    b = DynamicBatcher(fn, max_wait_ms=0)
    try:
        with pytest.raises(ValueError, match="bad item"):
            b([-1])
        assert b([5]).tolist() == [[5.0]]
    finally:
        b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b([1])


def test_direct_caller_makes_one_call_per_request():
    rec = Recorder()
    d = DirectCaller(rec)
    _together(d, 4)
    assert rec.sizes == [2, 2, 2, 2] and d.calls == 4


@pytest.mark.parametrize("kw", [{"max_wait_ms": -1}, {"max_wait_ms": 5000}, {"max_batch": 0}])
def test_bad_settings(kw):
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), **kw)
