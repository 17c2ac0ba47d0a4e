"""Dynamic batching: requests that arrive together share one encoder call.

:class:`DynamicBatcher` runs ``fn(items) -> array`` (one row per item) on a worker thread. A caller
submits its items and blocks on a future; the worker takes the first waiting request, then keeps
collecting for at most ``max_wait_ms`` (or until ``max_batch`` items), makes one call for all of them,
and hands each caller its rows. An error of the call goes to every caller of that batch. The wait is
bounded, so a lone request waits at most ``max_wait_ms`` longer than it would alone.

:class:`DirectCaller` is the same interface without batching (one call per request, in the caller's
thread); ``simsiam-kit serve --no-batching`` uses it, and the load benchmark compares the two.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

import numpy as np

#: the longest a request waits for others to join its batch (the issue's bound: <= 5 ms)
MAX_WAIT_MS = 5.0
#: the most items of one batched call
MAX_BATCH = 32


class DirectCaller:
    """``fn`` called once per request, in the caller's thread."""

    batching = False

    def __init__(self, fn: Callable[[list], np.ndarray]):
        self.fn = fn
        self.calls = 0

    def __call__(self, items: Sequence) -> np.ndarray:
        self.calls += 1
        return self.fn(list(items))

    def close(self) -> None:
        pass


class DynamicBatcher:
    """Batch concurrent calls of ``fn`` (see the module docstring). Call it like ``fn``; ``close()`` stops
    the worker (pending requests are answered first)."""

    batching = True

    def __init__(self, fn: Callable[[list], np.ndarray], max_wait_ms: float = MAX_WAIT_MS, max_batch: int = MAX_BATCH):
        if not 0 <= max_wait_ms <= 1000:
            raise ValueError(f"max_wait_ms must be in [0, 1000], got {max_wait_ms}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.fn, self.max_wait, self.max_batch = fn, max_wait_ms / 1000.0, int(max_batch)
        self.calls = 0  # encoder calls made (tests and the benchmark read it)
        self._q: queue.Queue = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="simsiam-kit-batcher", daemon=True)
        self._worker.start()

    def submit(self, items: Sequence) -> Future:
        fut: Future = Future()
        if self._closed:
            fut.set_exception(RuntimeError("the batcher is closed"))
            return fut
        self._q.put((list(items), fut))
        return fut

    def __call__(self, items: Sequence) -> np.ndarray:
        return self.submit(items).result()

    def close(self) -> None:
        self._closed = True
        self._q.put(None)
        self._worker.join(timeout=10)

    def _take(self) -> list:
        """The next batch: the first request (blocking), then what arrives within ``max_wait``."""
        first = self._q.get()
        if first is None:
            return []
        batch, n = [first], len(first[0])
        deadline = time.perf_counter() + self.max_wait
        while n < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                nxt = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if nxt is None:  # closing: answer what we hold, then stop
                self._q.put(None)
                break
            batch.append(nxt)
            n += len(nxt[0])
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            items = [x for its, _ in batch for x in its]
            try:
                self.calls += 1
                out = self.fn(items)
            except BaseException as e:  # every caller of the batch gets the error
                for _, fut in batch:
                    fut.set_exception(e)
                continue
            s = 0
            for its, fut in batch:
                fut.set_result(out[s : s + len(its)])
                s += len(its)
