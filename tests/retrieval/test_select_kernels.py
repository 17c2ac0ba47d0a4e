"""The compiled (numba) kernels of the CPU kNN search against worked examples, a numpy statement of the rule they
implement, the torch forms they replace, and concurrent callers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from simsiam_kit.retrieval import index as index_mod
from simsiam_kit.retrieval.index import kernels, knn_search_bf16, knn_search_torch, select_topk


@pytest.fixture
def compiled():
    if kernels() is None:
        pytest.skip("numba is not installed (the cpu extra): the torch forms run, tested elsewhere")
    return True


def test_selection_takes_equal_values_by_increasing_column(compiled):
    # 40 columns, block 2 -> 20 blocks (block j = columns j and j + 20), kk 3 (20 >= 4 x 3: the two-stage path).
    # Row 0: 3 at column 7; 2 at columns 30, 25, 12, 4 -> 7, then the two lowest columns holding 2: 4 and 12.
    # Row 1: all -1 but -0.0 at column 0 and 0.0 at column 9, 0.5 at 39 -> 39, then 0.0 (9) above -0.0 (0).
    a = torch.zeros(40)
    a[7] = 3.0
    a[[30, 25, 12, 4]] = 2.0
    b = torch.full((40,), -1.0)
    b[0], b[9], b[39] = -0.0, 0.0, 0.5
    for dtype in (torch.float32, torch.bfloat16):
        sim = torch.stack([a, b]).to(dtype)
        v, i = select_topk(sim, 3, block=2)
        assert i.tolist() == [[7, 4, 12], [39, 9, 0]]
        assert torch.equal(v, torch.topk(sim, 3, dim=1).values) and torch.equal(torch.gather(sim, 1, i), v)


@pytest.mark.parametrize("n", [4000, 4013])  # 4013: 13 columns after the last whole block
def test_selection_equals_topk_and_is_deterministic(compiled, n):
    g = torch.Generator().manual_seed(11)
    cont = torch.randn(70, n, generator=g)
    ties = torch.randint(0, 6, (70, n), generator=g).float()
    tail = torch.randn(70, n, generator=g)
    tail[:, n - 13 :] += 10.0  # the best entries in the columns after the whole blocks (or the last block)
    for sim in (cont, ties, tail):
        for dtype in (torch.float32, torch.bfloat16):
            s = sim.to(dtype)
            for kk in (1, 17, 60):
                v, i = select_topk(s, kk)
                assert torch.equal(v, torch.topk(s, kk, dim=1).values), (dtype, kk)
                assert torch.equal(torch.gather(s, 1, i), v)
                # equal values by increasing column: the rule gives one answer, whatever the threads
                assert bool(((v[:, 1:] < v[:, :-1]) | ((v[:, 1:] == v[:, :-1]) & (i[:, 1:] > i[:, :-1]))).all())
                # and the lowest such columns: every column left out holds a smaller value, or an equal one later
                cut_v, cut_i = v[:, -1:], i[:, -1:]
                cols = torch.arange(n).expand(len(s), n)
                chosen = torch.zeros(len(s), n, dtype=torch.bool).scatter_(1, i, True)
                left_out_better = ~chosen & ((s > cut_v) | ((s == cut_v) & (cols < cut_i)))
                assert not bool(left_out_better.any())


def _reference_bf16_search(bank, mean, c16, q, k, m):
    """knn_search_bf16's rule in numpy, with its tie rules stated: the k + m best by bf16 similarity (equal ones by
    increasing id); the first k - m kept at bf16 + q.mean; the rest re-scored in fp32, the best m of them (equal
    ones by increasing id); all k by similarity, then increasing id."""
    approx = torch.matmul(q.bfloat16(), c16.t()).float().numpy()
    qm = (q @ mean).numpy()
    keep = max(0, k - m)
    out_v, out_i = [], []
    for r in range(len(q)):
        order = np.lexsort((np.arange(approx.shape[1]), -approx[r]))[: k + m]
        kept = [(np.float32(approx[r, c] + qm[r]), int(c)) for c in order[:keep]]
        exact = (bank[torch.from_numpy(order[keep:])] @ q[r]).numpy()
        band = sorted(zip(exact.tolist(), order[keep:].tolist()), key=lambda t: (-t[0], t[1]))[: k - keep]
        both = sorted(kept + [(np.float32(v), c) for v, c in band], key=lambda t: (-t[0], t[1]))
        out_v.append([v for v, _ in both])
        out_i.append([c for _, c in both])
    return np.array(out_v, np.float32), np.array(out_i)


@pytest.mark.parametrize("rerank", [0, 5, 40])
def test_bf16_search_follows_its_rule(compiled, rerank):
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(5, 32, generator=g)
    bank = torch.nn.functional.normalize(centres[torch.arange(3000) % 5] + 0.3 * torch.randn(3000, 32, generator=g))
    q = torch.nn.functional.normalize(centres[torch.arange(150) % 5] + 0.3 * torch.randn(150, 32, generator=g))
    mean = bank.mean(0)
    c16 = (bank - mean).bfloat16()
    v, i = knn_search_bf16(bank, c16, mean, q, 20, rerank, chunk=150)
    rv, ri = _reference_bf16_search(bank, mean, c16, q, 20, rerank)
    assert np.array_equal(i.numpy(), ri)
    assert np.allclose(v.numpy(), rv, atol=2e-6, rtol=0)
    # the torch form takes any of the equal bf16 similarities at a cut (many here: 32-d vectors in bf16), so its ids
    # differ among equal values; without re-scoring its similarities are the same, and its recall alike
    tv, ti = knn_search_bf16(bank, c16, mean, q, 20, rerank, chunk=150, compiled=False)
    if rerank == 0:
        assert torch.equal(tv, v)
    ex = knn_search_torch(bank, q, 20)[1]
    recall = lambda ids: np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ids.tolist(), ex.tolist())])  # noqa: E731
    assert abs(recall(i) - recall(ti)) < 0.01


def test_without_numba_the_torch_forms_run(monkeypatch):
    monkeypatch.setattr(index_mod, "_KERNELS", False)  # as after a failed import
    assert kernels() is None
    g = torch.Generator().manual_seed(2)
    sim = torch.randint(0, 6, (9, 3001), generator=g).float()
    v, i = select_topk(sim, 12)
    assert torch.equal(v, torch.topk(sim, 12, dim=1).values) and torch.equal(torch.gather(sim, 1, i), v)
    bank = torch.nn.functional.normalize(torch.randn(2000, 16, generator=g), dim=1)
    mean = bank.mean(0)
    s, ids = knn_search_bf16(bank, (bank - mean).bfloat16(), mean, bank[:30], 5, rerank=40)
    assert ids[:, 0].tolist() == list(range(30))  # every candidate re-scored: each vector finds itself first


def test_searches_from_several_threads_at_once(compiled, monkeypatch):
    """A search service's request threads search at once: each search splits its rows over its own threads (no
    shared thread pool of numba's, whose default layer aborts on concurrent launches); results as one at a time."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    g = torch.Generator().manual_seed(9)
    bank = torch.nn.functional.normalize(torch.randn(5000, 32, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(400, 32, generator=g), dim=1)
    mean = bank.mean(0)
    c16 = (bank - mean).bfloat16()
    want = knn_search_bf16(bank, c16, mean, q, 10, 8)
    got: list = [None] * 6
    errors: list = []

    def run(t):
        try:
            got[t] = knn_search_bf16(bank, c16, mean, q, 10, 8)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for v, i in got:
        assert torch.equal(v, want[0]) and torch.equal(i, want[1])
