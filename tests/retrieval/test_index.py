"""The core's retrieval layer on four hand-made vectors: the tie rule (exact ranking, ties inside the
list and at the k-th place) on every exact backend, the kNN classifier's votes for several k and
temperatures worked by hand, the monitor's one-call form, and embed/search with a model passed in."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from simsiam_kit.retrieval.index import EmbeddingIndex, settle_ties
from simsiam_kit.retrieval.knn import KNNClassifier, knn_classify

# four unit vectors; rows 1 and 3 are equal, so they tie for every query
BANK = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]], np.float32)
LABELS = np.array([0, 1, 2, 2])
# query a = (1, 0): similarities 0, 1, 0.6, 1 -> ranking 1, 3, 2, 0 (1 before 3: equal, lower index first)
# query b = (0, 1): similarities 1, 0, 0.8, 0 -> ranking 0, 2, 1, 3 (1 and 3 tie at the 3rd place: 1 is kept)
QUERIES = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
RANKING = [[1, 3, 2, 0], [0, 2, 1, 3]]
SIMS = [[1.0, 1.0, 0.6, 0.0], [1.0, 0.8, 0.0, 0.0]]


def _backends():
    out = ["torch"]
    try:
        import faiss  # noqa: F401

        out.append("faiss")
    except ImportError:
        pass
    return out


def test_settle_ties_by_hand():
    # a backend's k + 1 = 4 best of a 10-vector row, similarities descending, ties in whatever order it found
    row = np.array([0.5, 0.1, 0.5, 0.2, 0.9, 0.3, 0.0, 0.5, 0.4, 0.5], np.float32)
    v = np.array([[0.9, 0.5, 0.5, 0.5]], np.float32)
    i = np.array([[4, 7, 9, 2]])
    asked = []

    def full_row(r):
        asked.append(r)
        return row

    s, ids = settle_ties(v, i, 3, full_row)
    # 0.5 ties across the cut (4th == 3rd): the row is rebuilt; the lowest ids among the four 0.5s are 0 and 2
    assert asked == [0]
    assert ids.tolist() == [[4, 0, 2]] and s == pytest.approx(np.array([[0.9, 0.5, 0.5]]))
    # no tie across the cut: the row is not read, equal similarities are put in id order
    s, ids = settle_ties(np.array([[0.9, 0.5, 0.5, 0.4]], np.float32), np.array([[4, 9, 2, 8]]), 3, None)
    assert ids.tolist() == [[4, 2, 9]]
    # an approximate backend's k best: ordered within the list, the cut stays as found
    s, ids = settle_ties(np.array([[0.9, 0.5, 0.5]], np.float32), np.array([[4, 9, 7]]), 3)
    assert ids.tolist() == [[4, 7, 9]]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_index_exact_ranking_with_ties(backend, k):
    index = EmbeddingIndex(2, "flat", backend, use_gpu=False).add(BANK)
    s, i = index.search(QUERIES, k)
    assert isinstance(s, np.ndarray) and s.dtype == np.float32 and i.dtype == np.int64
    assert i.tolist() == [r[:k] for r in RANKING]
    assert s == pytest.approx(np.array([r[:k] for r in SIMS]), abs=1e-7)
    # tensors in, tensors out: the same neighbours
    st, it = index.search(torch.from_numpy(QUERIES), k)
    assert isinstance(it, torch.Tensor) and it.tolist() == i.tolist() and torch.equal(st, torch.from_numpy(s))


def test_index_appends_and_checks_its_input():
    index = EmbeddingIndex(2, "flat", "torch", use_gpu=False).add(BANK[:2]).add(torch.from_numpy(BANK[2:]))
    assert index.ntotal == 4
    assert index.search(QUERIES, 4)[1].tolist() == RANKING
    with pytest.raises(Exception, match="dimension mismatch"):
        index.search(np.zeros((1, 3), np.float32), 1)
    with pytest.raises(Exception, match="larger than the number of indexed vectors"):
        index.search(QUERIES, 5)


@pytest.mark.parametrize("backend", _backends())
def test_classifier_votes_by_hand(backend):
    """Several k and temperatures from one search. With labels 0, 1, 2, 2:

    query a, neighbours 1 (s=1, class 1), 3 (s=1, class 2), 2 (s=0.6, class 2), 0 (s=0, class 0):
      k=1: class 1;  k=2: classes 1 and 2 both e^10 -> the lower class, 1;  k=3, T=0.1: class 2 (e^10 + e^6)
    query b, neighbours 0 (s=1, class 0), 2 (s=0.8, class 2), 1 (s=0, class 1), 3 (s=0, class 2):
      k=4, T=0.1: class 0 (e^10 > e^8 + 1);  k=4, T=1: class 2 (e^0.8 + 1 = 3.23 > e = 2.72)
    """
    knn = KNNClassifier(k=(1, 2, 3, 4), temperature=(0.1, 1.0), backend=backend)
    knn.update(torch.from_numpy(BANK[:3]), torch.from_numpy(LABELS[:3]))  # the bank in two parts
    out = knn.update(torch.from_numpy(BANK[3:]), torch.from_numpy(LABELS[3:])).compute(
        torch.from_numpy(QUERIES), torch.tensor([2, 2])
    )
    assert out.depth == 4 and out.ids.tolist() == RANKING
    assert out.neighbour_labels.tolist() == [[1, 2, 2, 0], [0, 2, 1, 2]]
    e = math.exp
    assert out.scores[(3, 0.1)][0].tolist() == pytest.approx([0.0, e(10), e(10) + e(6)], rel=1e-5)
    assert out.scores[(4, 1.0)][1].tolist() == pytest.approx([e(1), e(0), e(0.8) + e(0)], rel=1e-5)
    assert out.pred(1).tolist()[0] == 1
    assert out.pred(2).tolist()[0] == 1  # equal scores: the lowest class
    assert out.pred(3).tolist()[0] == 2
    assert out.pred(4, 0.1).tolist()[1] == 0 and out.pred(4, 1.0).tolist()[1] == 2
    assert out.accuracy[(4, 1.0)]["top1"] == 100.0  # both queries predicted 2
    assert out.accuracy[(4, 0.1)]["top1"] == 50.0 and out.accuracy[(4, 0.1)]["top5"] == 100.0
    assert out.pred().tolist() == out.pred(1, 0.1).tolist()  # default: the first k and temperature


def test_knn_classify_is_the_classifier_in_one_call():
    """The pretraining monitor's call: unnormalised features are l2-normalised, k is capped at the bank."""
    bank = torch.from_numpy(BANK) * torch.tensor([[3.0], [2.0], [5.0], [0.5]])
    pred, scores = knn_classify(bank, torch.from_numpy(LABELS), torch.from_numpy(QUERIES) * 7, k=3, temperature=0.1)
    assert pred.tolist() == [2, 0] and scores.shape == (2, 3)
    assert scores[1].tolist() == pytest.approx([math.exp(10), math.exp(0), math.exp(8)], rel=1e-5)
    pred9, _ = knn_classify(bank, torch.from_numpy(LABELS), torch.from_numpy(QUERIES), k=9, temperature=1.0)
    assert pred9.tolist() == [2, 2]  # k=4: query b as worked out above


@pytest.mark.parametrize("t", [float("nan"), float("inf"), 0.0, -0.1])
def test_a_temperature_that_is_not_a_positive_finite_number_is_refused(t):
    """The one check of kNN temperatures (issue 24): NaN passed "<= 0" and voted with exp(s / NaN)."""
    from simsiam_kit.errors import UserError

    with pytest.raises(UserError, match=f"temperature must be positive and finite, got {t}"):
        KNNClassifier(k=3, temperature=t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_knn_classify_searches_on_the_features_device():
    dev = torch.device("cuda")
    fb, lb, fq = torch.from_numpy(BANK).to(dev), torch.from_numpy(LABELS).to(dev), torch.from_numpy(QUERIES).to(dev)
    pred, scores = knn_classify(fb, lb, fq, k=3, temperature=0.1)
    assert pred.device.type == "cuda" and scores.device.type == "cuda"
    ref, _ = knn_classify(fb.cpu(), lb.cpu(), fq.cpu(), k=3, temperature=0.1)
    assert pred.cpu().tolist() == ref.tolist() == [2, 0]


class _ColourEmbedder:
    """A stand-in model runtime: the embedding of an image is its l2-normalised mean colour."""

    dim, provider, batch_size = 3, "python", 2

    def __init__(self, path):
        self.path = path
        self.meta = {"arch": "mean-colour", "head": "none", "image_size": 4}

    def embed(self, images):
        from PIL import Image

        arrs = [np.asarray(Image.open(im).convert("RGB") if isinstance(im, str) else im, np.float32) for im in images]
        z = np.stack([a.reshape(-1, 3).mean(0) for a in arrs])
        return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_embed_and_search_take_the_model_as_an_argument(tmp_path):
    from PIL import Image

    from simsiam_kit.retrieval.embed_search import embed_dataset_to_dir, format_search_table, search_images

    colours = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200], [100, 0, 0]], np.uint8)  # rows 0 and 3: both pure red
    images = np.repeat(np.repeat(colours[:, None, None, :], 4, 1), 4, 2)
    np.savez(
        tmp_path / "colours.npz",
        images=images,
        labels=np.array([0, 1, 2, 0]),
        class_names=np.array(["red", "green", "blue"]),
    )
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights")
    emb = _ColourEmbedder(model)
    manifest = embed_dataset_to_dir(emb, str(tmp_path / "colours.npz"), tmp_path / "emb", backend="torch")
    assert manifest["count"] == 4 and manifest["index"] == {"kind": "flat", "backend": "torch"}
    assert json.loads((tmp_path / "emb" / "ids.json").read_text()) == [0, 1, 2, 3]
    Image.fromarray(np.full((4, 4, 3), [50, 0, 0], np.uint8)).save(tmp_path / "red.png")
    rep = search_images(tmp_path / "emb", tmp_path / "red.png", _ColourEmbedder, k=3)
    # red ties with rows 0 and 3 (similarity 1): lower row first; then green and blue tie at 0: green (row 1)
    assert [(n["row"], n["class"]) for n in rep["results"][0]["neighbours"]] == [(0, "red"), (3, "red"), (1, "green")]
    assert [n["score"] for n in rep["results"][0]["neighbours"]] == pytest.approx([1.0, 1.0, 0.0], abs=1e-6)
    assert "red.png" in format_search_table(rep)


# ------------------------------------------------------------------ the approximate bf16 kind
def _clustered(n, d=64, seed=0):
    """Unit vectors in a narrow cone (similarities 0.998-0.9999, as a random-init ResNet's features): the
    case where bf16 rounding of the similarities (steps of 2^-8 near 1) scrambles the ranking."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g)
    return lambda m: torch.nn.functional.normalize(mu + 0.05 * torch.randn(m, d, generator=g), dim=1)


def _recall(ids, exact_ids):
    return (ids.unsqueeze(2) == exact_ids.unsqueeze(1)).any(2).float().mean().item()


def test_bf16_kind_centres_the_bank_and_re_scores_the_cut_in_fp32():
    from simsiam_kit.retrieval.index import knn_search_bf16

    make = _clustered(0)
    bank, q = make(2000), make(50)
    ex_s, ex_i = EmbeddingIndex(64, "flat", "torch").add(bank).search(q, 20)
    # without the centring, bf16 similarities near 1 cannot rank this bank: almost no true neighbour found
    _, raw_i = knn_search_bf16(bank, bank.bfloat16(), torch.zeros(64), q, 20, rerank=0)
    assert _recall(raw_i, ex_i) < 0.2
    # centred: most found with bf16 similarities alone (rerank 0); re-scoring the 2 x 5 candidates around
    # the cut in fp32 finds more; rerank >= k re-scores all k + rerank candidates
    got = {}
    for rerank in (0, 5, 32):
        idx = EmbeddingIndex(64, "bf16", "auto", rerank=rerank).add(bank)
        assert idx.backend == "torch"
        got[rerank] = idx.search(q, 20)
        assert (got[rerank][0][:, 1:] <= got[rerank][0][:, :-1]).all()
    rec = {r: _recall(i, ex_i) for r, (_, i) in got.items()}
    assert 0.9 <= rec[0] < rec[5] < rec[32] and rec[32] >= 0.99
    # similarities: bf16-derived at rerank 0 (close to fp32, not equal), fp32 dot products at rerank >= k
    for rerank, tol in ((0, 4e-3), (32, 5e-6)):
        s, i = got[rerank]
        same = i == ex_i
        assert torch.allclose(s[same], ex_s[same], atol=tol, rtol=0)
    s0, i0 = got[0]
    assert (s0[i0 == ex_i] - ex_s[i0 == ex_i]).abs().max() > 1e-5


def test_bf16_kind_is_exact_when_the_candidates_cover_the_bank():
    make = _clustered(1)
    bank, q = make(300), make(40)
    ex_s, ex_i = EmbeddingIndex(64, "flat", "torch").add(bank).search(q, 10)
    s, i = EmbeddingIndex(64, "bf16", "torch", rerank=290).add(bank).search(q, 10)
    assert torch.equal(i, ex_i)
    assert torch.allclose(s, ex_s, atol=5e-6, rtol=0)


def test_bf16_kind_settings_are_checked_and_saved(tmp_path):
    from simsiam_kit.errors import UserError

    with pytest.raises(UserError, match="needs the torch backend"):
        EmbeddingIndex(8, "bf16", "faiss")
    with pytest.raises(UserError, match="needs the faiss backend"):
        EmbeddingIndex(8, "ivf", "torch")
    for bad in (-1, 2.5, True):
        with pytest.raises(UserError, match="rerank"):
            EmbeddingIndex(8, "bf16", rerank=bad)
    bank = _clustered(2, d=8)(100)
    idx = EmbeddingIndex(8, "bf16", rerank=7).add(bank)
    idx.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert meta["kind"] == "bf16" and meta["rerank"] == 7
    back = EmbeddingIndex.load(tmp_path / "ix")
    assert (back.kind, back.backend, back.rerank) == ("bf16", "torch", 7)
    assert torch.equal(back.search(bank[:5], 3)[1], idx.search(bank[:5], 3)[1])
    # an index.json written before the bf16 kind (no "rerank" key) still loads
    del meta["rerank"]
    meta["kind"] = "flat"
    (tmp_path / "ix" / "index.json").write_text(json.dumps(meta))
    assert EmbeddingIndex.load(tmp_path / "ix").kind == "flat"
    meta["rerank"] = -3
    (tmp_path / "ix" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="index.json.*rerank"):
        EmbeddingIndex.load(tmp_path / "ix")
