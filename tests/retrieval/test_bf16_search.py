"""The selection and ordering routines of the approximate bf16 search, against torch.topk and settle_ties on tiny
inputs with the ties worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simsiam_kit.retrieval.index import (
    BF16_CHUNK,
    CHUNK_MEMORY,
    FP32_CHUNK,
    EmbeddingIndex,
    knn_search_bf16,
    knn_search_torch,
    order_ties,
    query_chunk,
    select_topk,
    settle_ties,
)


def test_select_topk_by_hand_with_ties_inside_one_block():
    # 32 columns, block 2 -> 16 blocks, block j = columns {j, j + 16}. Value 3 at columns 5 and 21 (one block),
    # value 2 at columns 0, 9 and 30, 1 at column 17 (block 1), 0 elsewhere.
    row = torch.zeros(32)
    row[[5, 21]] = 3.0
    row[[0, 9, 30]] = 2.0
    row[17] = 1.0
    sim = torch.stack([row, row.flip(0)])  # the second row: the same values at columns 31 - c
    v, i = select_topk(sim, 4, block=2)
    assert v.tolist() == [[3.0, 3.0, 2.0, 2.0]] * 2  # torch.topk's values, sorted descending
    assert torch.equal(v, torch.topk(sim, 4, dim=1).values)
    assert set(i[0, :2].tolist()) == {5, 21} and set(i[0, 2:].tolist()) <= {0, 9, 30}
    assert set(i[1, :2].tolist()) == {26, 10} and set(i[1, 2:].tolist()) <= {31, 22, 1}
    # ordered by the tie rule: equal similarities by increasing column
    ov, oi = order_ties(v, i)
    assert oi[0, :2].tolist() == [5, 21] and oi[1, :2].tolist() == [10, 26]
    assert oi[0, 2] < oi[0, 3] and oi[1, 2] < oi[1, 3]


def test_select_topk_keeps_a_tail_that_is_not_a_whole_block():
    # 35 columns, block 2 -> 17 blocks over columns 0..33; column 34 is the tail, holding the maximum
    sim = torch.arange(35, dtype=torch.float32).remainder(7).unsqueeze(0)  # 0..6 repeating: 6 at 6, 13, 20, 27, 34
    v, i = select_topk(sim, 4, block=2)
    assert v.tolist() == [[6.0, 6.0, 6.0, 6.0]]
    assert set(i[0].tolist()) <= {6, 13, 20, 27, 34} and len(set(i[0].tolist())) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_topk_matches_torch_topk_on_tie_heavy_input(dtype):
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 6, (9, 301), generator=g).to(dtype)  # six values: ties everywhere, at every cut
    for kk in (1, 7, 18):
        v, i = select_topk(sim, kk, block=4)
        assert v.dtype == dtype and torch.equal(v, torch.topk(sim, kk, dim=1).values)
        assert torch.equal(torch.gather(sim, 1, i), v)  # the ids hold those values
        assert all(len(set(r)) == kk for r in i.tolist())  # distinct columns


def test_order_ties_by_hand_and_as_settle_ties():
    v = torch.tensor([[0.5, 0.9, 0.5, 0.7, 0.5], [0.1, 0.1, 0.1, 0.1, 0.2]])
    i = torch.tensor([[9, 4, 2, 8, 3], [7, 1, 5, 0, 6]])
    ov, oi = order_ties(v, i)
    assert torch.equal(ov, torch.tensor([[0.9, 0.7, 0.5, 0.5, 0.5], [0.2, 0.1, 0.1, 0.1, 0.1]]))
    assert oi.tolist() == [[4, 8, 2, 3, 9], [6, 0, 1, 5, 7]]
    # the same order as the numpy tie rule for an approximate list (kk = k, no row), on tie-heavy input
    g = torch.Generator().manual_seed(1)
    v = torch.randint(0, 4, (50, 12), generator=g).float()
    i = torch.stack([torch.randperm(100, generator=g)[:12] for _ in range(50)])
    v, o = torch.sort(v, dim=1, descending=True)  # settle_ties takes lists sorted by similarity
    i = torch.gather(i, 1, o)
    sv, si = settle_ties(v.numpy().copy(), i.numpy().copy(), 12)
    ov, oi = order_ties(v, i)
    assert np.array_equal(ov.numpy(), sv) and np.array_equal(oi.numpy(), si)
    shuffle = torch.randperm(12, generator=g)  # any order in: order_ties sorts whole lists
    ov, oi = order_ties(v[:, shuffle], i[:, shuffle])
    assert np.array_equal(ov.numpy(), sv) and np.array_equal(oi.numpy(), si)


def test_order_ties_key_handles_signs_zeros_and_large_ids():
    """The one-sort key (float32): negative similarities, -0.0 equal to 0.0, ids up to 2^31 - 1; the same order as
    the two-sort form (float64 input takes it) and as the numpy tie rule."""
    big = 2**31 - 1
    v = torch.tensor([[-0.5, 0.0, -0.0, 0.25, -0.5, -1e-30, 3e38]], dtype=torch.float32)
    i = torch.tensor([[7, big, 3, 0, big - 1, 12, 5]])
    ov, oi = order_ties(v, i)
    assert oi.tolist() == [[5, 0, 3, big, 12, 7, big - 1]]  # 0.0 and -0.0 tie: by id; -1e-30 < 0; -0.5 twice: by id
    assert torch.equal(ov, torch.tensor([[3e38, 0.25, 0.0, 0.0, -1e-30, -0.5, -0.5]], dtype=torch.float32))
    g = torch.Generator().manual_seed(3)
    v = (torch.randint(-4, 5, (40, 16), generator=g).float() / 3).contiguous()
    i = torch.stack([torch.randperm(1000, generator=g)[:16] * 2_000_000 for _ in range(40)])  # ids up to ~2e9
    one_sort = order_ties(v, i)
    two_sorts = order_ties(v.double(), i)
    assert torch.equal(one_sort[1], two_sorts[1]) and torch.equal(one_sort[0].double(), two_sorts[0])
    vs, o = torch.sort(v, dim=1, descending=True)
    sv, si = settle_ties(vs.numpy().copy(), torch.gather(i, 1, o).numpy().copy(), 16)
    assert np.array_equal(one_sort[0].numpy(), sv) and np.array_equal(one_sort[1].numpy(), si)


def test_bf16_search_with_every_candidate_re_scored_is_the_exact_search():
    """rerank >= k: every candidate scored in fp32; on well-spread vectors (no bf16 ties at the candidate cut
    that matter) the k found are the exact ones, ties ordered the same way."""
    g = torch.Generator().manual_seed(2)
    bank = torch.nn.functional.normalize(torch.randn(3000, 32, generator=g), dim=1)
    bank[10] = bank[20]  # an exact tie: the same vector twice
    q = torch.cat([bank[20:21], torch.nn.functional.normalize(torch.randn(30, 32, generator=g), dim=1)])
    ex_s, ex_i = EmbeddingIndex(32, "flat", "torch").add(bank).search(q, 5)
    mean = bank.mean(0)
    s, i = knn_search_bf16(bank, (bank - mean).bfloat16(), mean, q, 5, rerank=40, chunk=8, sub=3)
    assert torch.equal(i, ex_i) and torch.allclose(s, ex_s, atol=1e-6, rtol=0)
    assert i[0, :2].tolist() == [10, 20]  # the tie: lower id first
    empty_s, empty_i = knn_search_bf16(bank, (bank - mean).bfloat16(), mean, q[:0], 5)
    assert empty_s.shape == empty_i.shape == (0, 5)


def test_query_chunk_from_the_bank_size_and_the_memory_budget():
    """The worked numbers of query_chunk's docstring: the (chunk x bank rows) similarity block within 256 MiB."""
    assert CHUNK_MEMORY == 268_435_456 and (BF16_CHUNK, FP32_CHUNK) == (2048, 1024)
    assert query_chunk(45_000, 2, BF16_CHUNK) == 2048  # 2,048 x 45,000 x 2 = 184,320,000 bytes
    assert query_chunk(65_536, 2, BF16_CHUNK) == 2048  # exactly 268,435,456 bytes
    assert query_chunk(65_537, 2, BF16_CHUNK) == 1024  # one row more: halved
    assert query_chunk(100_000, 2, BF16_CHUNK) == 1024  # 409,600,000 -> 204,800,000 bytes
    assert query_chunk(1_281_167, 2, BF16_CHUNK) == 64  # 128 would need 327,978,752 bytes
    assert query_chunk(45_000, 4, FP32_CHUNK) == 1024 and query_chunk(1_281_167, 4, FP32_CHUNK) == 32
    # a tiny bank: 10 rows x 2 bytes = 20 bytes per query; 100 bytes hold 5 queries -> 2048 halved to 4
    assert query_chunk(10, 2, BF16_CHUNK, memory=100) == 4
    assert query_chunk(10, 2, BF16_CHUNK, memory=19) == 1  # not even one query's row fits: one at a time


def _exact_bank_and_queries():
    """Vectors whose every dot product is exact in bf16 and fp32 whatever the summation order (entries multiples of
    1/4 in [-1, 1], 8 dimensions: products multiples of 1/16 up to 8), with many ties; each bank vector is there with
    its negation, so the bank's mean is exactly 0 and its centred bf16 copy equals it."""
    g = torch.Generator().manual_seed(5)
    half = torch.randint(-4, 5, (20, 8), generator=g).float() / 4
    bank = torch.cat([half, -half])  # 40 rows
    queries = torch.randint(-4, 5, (23, 8), generator=g).float() / 4
    return bank, queries


def test_bf16_search_chooses_its_chunk_from_the_bank_and_gives_the_same_results_at_any_chunk(monkeypatch):
    bank, q = _exact_bank_and_queries()
    mean = bank.mean(0)
    assert torch.equal(mean, torch.zeros(8))
    c16 = (bank - mean).bfloat16()
    seen = []
    matmul = torch.matmul

    def spy(a, b, **kw):
        seen.append(a.shape[0])
        return matmul(a, b, **kw)

    monkeypatch.setattr(torch, "matmul", spy)
    # 40 bank rows x 2 bytes = 80 bytes per query: a 400-byte budget holds 5 queries -> chunks of 4 (23 = 5 x 4 + 3)
    s, i = knn_search_bf16(bank, c16, mean, q, 5, rerank=2, sub=3, memory=400)
    assert seen == [4, 4, 4, 4, 4, 3]
    seen.clear()
    knn_search_bf16(bank, c16, mean, q, 5, rerank=2, sub=3)  # the default budget: all 23 queries in one GEMM
    assert seen == [23]
    for chunk in (1, 3, 7, 2048):
        cs, ci = knn_search_bf16(bank, c16, mean, q, 5, rerank=2, sub=3, chunk=chunk)
        assert torch.equal(cs, s) and torch.equal(ci, i), chunk
    # the exact search likewise: 40 x 4 bytes = 160 bytes per query, 400 bytes -> chunks of 2
    seen.clear()
    es, ei = knn_search_torch(bank, q, 5, memory=400)
    assert seen == [2] * 11 + [1]
    for chunk in (1, 5, 1024):
        cs, ci = knn_search_torch(bank, q, 5, chunk=chunk)
        assert torch.equal(cs, es) and torch.equal(ci, ei), chunk
    # and the scores are the true inner products, ties by increasing id (the tie rule)
    assert torch.equal(es, torch.gather(q @ bank.t(), 1, ei))
    assert bool(((es[:, 1:] < es[:, :-1]) | ((es[:, 1:] == es[:, :-1]) & (ei[:, 1:] > ei[:, :-1]))).all())
