"""Chunked catalogue scoring equals the unchunked computation; metrics on hand-worked ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recdistill.models.scoring import catalogue_cross_entropy, catalogue_stats
from recdistill.trainer.evaluation import (
    eval_split,
    popularity_metrics,
    ranking_sums,
    sampled_metrics,
)
from recdistill.trainer.metrics import finalize, metric_sums


def full_scores(user_reps, table):
    scores = user_reps @ table.T
    scores[:, 0] = float("-inf")
    return scores


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_chunked_cross_entropy_matches_full(chunk_size):
    torch.manual_seed(0)
    reps = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    table = torch.randn(101, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, 101, (9,))
    reference = F.cross_entropy(full_scores(reps, table), targets, reduction="none")
    weights = torch.rand(9, dtype=torch.float64)
    ref_grads = torch.autograd.grad((reference * weights).sum(), (reps, table))

    chunked = catalogue_cross_entropy(reps, table, targets, chunk_size)
    grads = torch.autograd.grad((chunked * weights).sum(), (reps, table))
    torch.testing.assert_close(chunked, reference)
    torch.testing.assert_close(grads[0], ref_grads[0])
    torch.testing.assert_close(grads[1], ref_grads[1])
    assert grads[1][0].abs().sum() == 0  # the padding row never gets a gradient


def test_chunked_cross_entropy_frozen_table():
    reps = torch.randn(4, 8, requires_grad=True)
    table = torch.randn(30, 8)
    loss = catalogue_cross_entropy(reps, table, torch.tensor([1, 5, 29, 3]), 4).sum()
    loss.backward()
    assert reps.grad is not None and torch.isfinite(reps.grad).all()


@pytest.mark.parametrize("chunk_size", [3, 50, 4096])
def test_chunked_topk_logsumexp_and_ranks(chunk_size):
    torch.manual_seed(1)
    reps, table = torch.randn(6, 12), torch.randn(301, 12)
    targets = torch.randint(1, 301, (6,))
    stats = catalogue_stats(
        reps, table, k=10, targets=targets, temperatures=(1.0, 2.0), chunk_size=chunk_size
    )
    scores = full_scores(reps, table)
    top_scores, top_ids = scores.topk(10, dim=1)
    assert torch.equal(stats.topk_ids, top_ids)
    torch.testing.assert_close(stats.topk_scores, top_scores)
    torch.testing.assert_close(stats.logsumexp[:, 0], torch.logsumexp(scores, 1))
    torch.testing.assert_close(stats.logsumexp[:, 1], torch.logsumexp(scores / 2.0, 1))
    target_scores = scores.gather(1, targets[:, None])
    assert torch.equal(stats.target_ranks, (scores > target_scores).sum(1).double())


def test_exclude_masks_history_from_topk_and_rank():
    reps = torch.tensor([[1.0, 0.0]])
    table = torch.tensor([[0.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])  # item scores 3, 2, 1
    stats = catalogue_stats(
        reps, table, k=2, targets=torch.tensor([3]), exclude=torch.tensor([[1, 0]]), chunk_size=2
    )
    assert stats.topk_ids.tolist() == [[2, 3]] and stats.target_ranks.tolist() == [1]


def test_ties_count_half_so_an_all_equal_model_ranks_targets_mid_catalogue():
    # A zero user vector scores all 8 items 0: each target ties with the 7 others -> rank 3.5,
    # in every chunking; counting only strictly higher scores would give rank 0 (HR@1 = 1).
    table = torch.randn(9, 4)
    for chunk_size in (2, 3, 100):
        stats = catalogue_stats(
            torch.zeros(2, 4), table, targets=torch.tensor([1, 8]), chunk_size=chunk_size
        )
        assert stats.target_ranks.tolist() == [3.5, 3.5]
    values = finalize(metric_sums(stats.target_ranks))
    assert values["hr@1"] == 0.0 and values["hr@5"] == 1.0
    assert values["ndcg@5"] == pytest.approx(1 / math.log2(5.5))
    # one item above, two tying with the target (items 2, 3 equal): rank 1 + 2 * 0.5 = 2
    table = torch.tensor([[0.0], [3.0], [2.0], [2.0], [2.0], [1.0]])
    stats = catalogue_stats(torch.ones(1, 1), table, targets=torch.tensor([3]), chunk_size=2)
    assert stats.target_ranks.tolist() == [2.0]


def test_popularity_and_sampled_metrics_count_ties_half():
    # every item seen once: all tie, so the target sits at (4 - 1) / 2 = 1.5 among 4 items
    values = popularity_metrics([[1, 2, 3, 4]], [([1], 2)], 4)
    assert values["mrr"] == pytest.approx(1 / 2.5)
    scores = torch.zeros(1, 6)  # the padding column and 5 items, all equal
    values = sampled_metrics(lambda ids, lengths: scores, [([1], 2)], 5, 8, "cpu", negatives=4)
    assert values["mrr"] == pytest.approx(1 / 3)  # 4 negatives tie: rank 2


def test_metrics_hand_worked():
    # ranks 0, 3, 12: HR@1 1/3, HR@5 2/3, HR@10 2/3, HR@20 1; NDCG@10 (1 + 1/log2(5)) / 3
    values = finalize(metric_sums(torch.tensor([0, 3, 12])))
    assert values["hr@1"] == pytest.approx(1 / 3) and values["hr@5"] == pytest.approx(2 / 3)
    assert values["hr@10"] == pytest.approx(2 / 3) and values["hr@20"] == pytest.approx(1.0)
    assert values["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert values["ndcg@20"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 3)
    assert values["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 13) / 3)
    assert values["count"] == 3


def test_metric_weights_drop_padding_rows():
    weighted = finalize(metric_sums(torch.tensor([0, 50, 50]), torch.tensor([1.0, 1.0, 0.0])))
    assert weighted["hr@10"] == pytest.approx(0.5) and weighted["count"] == 2


def _fixed_score_rank_fn(table):
    """Every user has the same representation [1, 0]: item scores are table[:, 0]."""

    def rank_fn(ids, lengths, targets, exclude):
        reps = torch.tensor([[1.0, 0.0]]).expand(ids.shape[0], 2)
        return catalogue_stats(reps, table, targets=targets, exclude=exclude).target_ranks

    return rank_fn


def test_exclude_seen_ranks_out_the_whole_history_not_only_the_window():
    # item scores: 1 -> 4, 2 -> 3, 3 -> 2, 4 -> 1. The user saw [1, 2]; the model sees only the
    # last item (max_len 1); the target is 3.
    table = torch.tensor([[0.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    splits = {"test": {"history": [[1, 2]], "target": [3]}}
    examples, seen = eval_split(splits, "test", max_len=1, exclude_history=True)
    assert examples == [([2], 3)] and seen == [[1, 2]]
    assert eval_split(splits, "test", max_len=1)[1] is None
    rank_fn = _fixed_score_rank_fn(table)
    everything = finalize(ranking_sums(rank_fn, examples, 4, "cpu"))
    unseen = finalize(ranking_sums(rank_fn, examples, 4, "cpu", seen=seen))
    assert everything["mrr"] == pytest.approx(1 / 3)  # items 1 and 2 outrank the target
    assert unseen["mrr"] == pytest.approx(1.0)  # both seen: the target is first
    assert unseen["ndcg@10"] == pytest.approx(1.0) and everything["ndcg@10"] == pytest.approx(0.5)


def test_popularity_ranks_out_seen_items():
    # training counts: item 1 x3, item 2 x2, item 3 x1, item 4 x0
    train_items = [[1, 2, 3], [1, 2], [1]]
    examples = [([1], 3), ([4], 2)]
    seen = [[1], [4, 1]]
    everything = popularity_metrics(train_items, examples, 4)
    unseen = popularity_metrics(train_items, examples, 4, seen)
    # ranks without exclusion: 2 (items 1, 2) and 1 (item 1); with it: 1 (item 2) and 0
    assert everything["mrr"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert unseen["mrr"] == pytest.approx((1 / 2 + 1) / 2)
