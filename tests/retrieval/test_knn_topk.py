"""Top-k accuracy of the kNN vote, worked by hand: a class that received no vote is never a hit (the
strict rule), whatever order ``topk`` gives the zero scores."""

import torch

from simsiam_kit.retrieval import topk_accuracy, weighted_vote


def test_top5_counts_only_classes_that_received_votes():
    # 3 queries, 2 neighbours each, 8 classes; T = 1 so a vote weighs exp(sim)
    sims = torch.tensor([[0.9, 0.8], [0.9, 0.1], [0.5, 0.4]])
    neighbour_labels = torch.tensor([[2, 2], [1, 3], [0, 6]])
    scores = weighted_vote(sims, neighbour_labels, 8, 1.0)
    assert scores[0].nonzero().flatten().tolist() == [2] and scores[1].nonzero().flatten().tolist() == [1, 3]
    labels = torch.tensor([2, 3, 7])  # hit at rank 1; hit at rank 2; class 7 got no vote
    acc = topk_accuracy(scores, labels, (1, 5))
    assert abs(acc["top1"] - 100.0 / 3) < 1e-4
    assert abs(acc["top5"] - 200.0 / 3) < 1e-4  # the third query's label is among 5 "highest" only as a zero score
    # the lenient count (any of the first 5 by topk, zeros included) can credit it, depending on tie order
    zero_ranked = scores.topk(5, dim=1).indices
    assert (scores[2, zero_ranked[2]] == 0).sum() == 3
