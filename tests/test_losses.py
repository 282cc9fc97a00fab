"""Each loss against a hand-computed case; the objective computes exactly the switched-on terms."""

from __future__ import annotations

import math

import pytest
import torch

from recdistill.models.distillation import LOSS_DEFAULTS, DistillationObjective, default_pairs
from recdistill.models.gru4rec import GRU4Rec, GRU4RecConfig
from recdistill.models.losses import (
    CollaborativeEmbedding,
    feature_alignment,
    next_item_bce,
    ranking_distillation,
    ranking_weights,
    topk_kl,
)
from recdistill.models.sasrec import SASRec, SASRecConfig
from recdistill.models.scoring import catalogue_logsumexp
from recdistill.trainer.distill import LossWatch, expected_terms


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_bce_hand_worked():
    value = next_item_bce(torch.tensor([2.0]), torch.tensor([-1.0]))
    assert value.item() == pytest.approx(-math.log(sigmoid(2.0)) - math.log(1 - sigmoid(-1.0)))


def test_ranking_weights_hand_worked():
    confidence = torch.tensor([[0.0, 1.0]])
    in_top = torch.tensor([[True, False]])
    w = ranking_weights(confidence, in_top, (0.3, 0.5, 0.1), position_lambda=1.0)
    e = math.exp(-1)
    w_p = [1 / (1 + e), e / (1 + e)]
    w_c = [1 / (1 + e), e / (1 + e)]
    w_o = [1.0, 0.0]
    mixed = [0.3 * w_p[i] + 0.5 * w_c[i] + 0.1 * w_o[i] for i in range(2)]
    expected = [m / sum(mixed) for m in mixed]
    assert w[0].tolist() == pytest.approx(expected)


def test_ranking_distillation_uses_the_correct_negative_term():
    cand, neg, weights = (
        torch.tensor([[1.0, -0.5]]),
        torch.tensor([[0.2, 3.0]]),
        torch.tensor([[0.75, 0.25]]),
    )
    value = ranking_distillation(cand, neg, weights).item()
    expected = sum(
        w * (-math.log(sigmoid(c)) - math.log(1 - sigmoid(n)))
        for c, n, w in zip([1.0, -0.5], [0.2, 3.0], [0.75, 0.25])
    )
    assert value == pytest.approx(expected, rel=1e-6)
    # the reference code's log(sigmoid(1 - s_neg)) would give a different number
    wrong = sum(
        w * (-math.log(sigmoid(c)) - math.log(sigmoid(1 - n)))
        for c, n, w in zip([1.0, -0.5], [0.2, 3.0], [0.75, 0.25])
    )
    assert value != pytest.approx(wrong, rel=1e-3)


def test_topk_kl_renormalized_hand_worked():
    teacher, student = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    expected = sum(pi * math.log(pi / 0.5) for pi in p)
    assert topk_kl(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-5)
    # temperature: scores divided by T, result multiplied by T^2
    p2 = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]
    expected2 = 4 * sum(pi * math.log(pi / 0.5) for pi in p2)
    assert topk_kl(student, teacher, 2.0).item() == pytest.approx(expected2, rel=1e-5)


def test_topk_kl_tail_bucket_uses_full_catalogue_mass():
    torch.manual_seed(0)
    teacher_full, student_full = torch.randn(1, 30), torch.randn(1, 30)
    top = teacher_full.topk(5, dim=1).indices
    value = topk_kl(
        student_full.gather(1, top),
        teacher_full.gather(1, top),
        1.0,
        "bucket",
        torch.logsumexp(teacher_full, 1),
        torch.logsumexp(student_full, 1),
    )
    p, q = teacher_full.softmax(1), student_full.softmax(1)
    p_k, q_k = p.gather(1, top)[0], q.gather(1, top)[0]
    p_all = torch.cat([p_k, 1 - p_k.sum(0, keepdim=True)])
    q_all = torch.cat([q_k, 1 - q_k.sum(0, keepdim=True)])
    assert value.item() == pytest.approx(float((p_all * (p_all / q_all).log()).sum()), rel=1e-4)


def test_catalogue_logsumexp_and_gradient():
    reps = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    table = torch.randn(20, 8, dtype=torch.float64)
    value = catalogue_logsumexp(reps, table, chunk_size=6)
    scores = reps @ table.T
    expected = torch.logsumexp(scores[:, 1:], dim=1)
    torch.testing.assert_close(value, expected)
    grad = torch.autograd.grad(value.sum(), reps)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), reps)[0])


def test_feature_alignment_hand_worked():
    cosine, squared = feature_alignment(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    assert cosine.item() == pytest.approx(1 - 1 / math.sqrt(2))
    assert squared.item() == pytest.approx(0.5)


def test_collaborative_embedding_adds_weighted_projection_and_keeps_padding():
    table = torch.randn(5, 4)
    ced = CollaborativeEmbedding(table, 3, weight=0.3)
    student_table = torch.zeros(5, 3)
    combined = ced(student_table)
    torch.testing.assert_close(combined[1:], 0.3 * ced.projection(table)[1:])
    assert combined[0].abs().sum() == 0


def fake_batch(num_items=30, k=6, hidden=16):
    """3 users x 5 positions, every position with a target: M = 15 rows of teacher outputs."""
    torch.manual_seed(0)
    ids = torch.randint(1, num_items + 1, (3, 5))
    return {
        "item_ids": ids,
        "lengths": torch.tensor([5, 5, 5]),
        "target_positions": torch.arange(15),
        "targets": torch.randint(1, num_items + 1, (15,)),
        "teacher_topk_ids": torch.randint(1, num_items + 1, (15, k)),
        "teacher_topk_scores": torch.randn(15, k).sort(-1, descending=True).values.half(),
        "teacher_logsumexp": torch.full((15, 1), 8.0),
        "teacher_target_logprob": torch.full((15,), -3.0),
        "hidden_positions": torch.tensor([[4], [4], [4]]),
        "hidden_mask": torch.ones(3, 1, dtype=torch.bool),
        "hidden_2": torch.randn(3, 1, hidden),
    }


MANIFEST = {"hidden_layers": [2], "hidden_size": 16, "teacher_layers": 2, "temperatures": [1.0]}


def objective_with(**switches):
    cfg = {
        key: (dict(value) if isinstance(value, dict) else value)
        for key, value in LOSS_DEFAULTS.items()
    }
    for name, updates in switches.items():
        cfg[name].update(updates)
    student = SASRec(SASRecConfig(num_items=30, hidden_size=8, num_blocks=2, max_len=5))
    return DistillationObjective(
        student, cfg, MANIFEST, torch.randn(31, 12), block_dims=[8, 8]
    ), cfg


@pytest.mark.parametrize(
    "switches,terms",
    [
        ({}, {"next_item"}),
        ({"ranking": {"enabled": True, "k": 4}}, {"next_item", "ranking"}),
        ({"logits": {"enabled": True, "tail": "bucket"}}, {"next_item", "logits"}),
        (
            {"alignment": {"enabled": True, "multi_supervision_weight": 0.5}},
            {"next_item", "align_cos", "align_l2", "multi_supervision"},
        ),
        ({"embedding": {"enabled": True}}, {"next_item"}),
    ],
)
def test_each_switch_adds_exactly_its_terms(switches, terms):
    objective, cfg = objective_with(**switches)
    out = objective(fake_batch())
    assert set(out) - {"total"} == terms == set(expected_terms(cfg))
    torch.testing.assert_close(out["total"], sum(out[t] for t in terms))
    out["total"].backward()
    grads = [p.grad for p in objective.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert (objective.collaborative is not None) == bool(switches.get("embedding"))


def test_ranking_weight_scales_the_term():
    low, _ = objective_with(ranking={"enabled": True, "weight": 0.7, "k": 4})
    high, _ = objective_with(ranking={"enabled": True, "weight": 1.4, "k": 4})
    high.load_state_dict(low.state_dict())
    torch.manual_seed(1)
    a = low(fake_batch())["ranking"]
    torch.manual_seed(1)
    b = high(fake_batch())["ranking"]
    torch.testing.assert_close(b, 2 * a)


def test_default_pairs_slmrec_setting():
    assert default_pairs(4, 8, [2, 4, 6, 8]) == {1: 2, 2: 4, 3: 6, 4: 8}
    assert default_pairs(2, 4, [2, 4]) == {1: 2, 2: 4}


def test_loss_watch_stops_on_dead_or_nan_terms():
    # the job hands it each logging window's mean of every term (terms are never negative, so a
    # mean of 0 means 0 at every step of the window)
    watch = LossWatch(["ranking"], window=3)
    watch.update({"ranking": 0.1}, 3)
    with pytest.raises(RuntimeError, match="'ranking'.*0 for the last 3 steps"):
        watch.update({"ranking": 0.0}, 6)
    with pytest.raises(RuntimeError, match="nan"):
        LossWatch(["ranking"], 3).update({"ranking": float("nan")}, 3)
    with pytest.raises(RuntimeError, match="not computed"):
        LossWatch(["logits"], 3).update({"next_item": 1.0}, 3)


def test_bce_next_item_switch():
    objective, _ = objective_with()
    objective.cfg = {**objective.cfg, "next_item": "bce"}
    batch = fake_batch()
    torch.manual_seed(5)
    value = objective(batch)["next_item"]
    # recompute with the same negatives: the mean of -log s(pos) - log(1 - s(neg)) over positions
    torch.manual_seed(5)
    out, table = objective.encode(batch["item_ids"], batch["lengths"])
    reps, targets = out.user_reps.flatten(0, 1)[batch["target_positions"]], batch["targets"]
    negatives = torch.randint(1, 31, targets.shape)
    pos, neg = (reps * table[targets]).sum(-1), (reps * table[negatives]).sum(-1)
    expected = (-torch.log(torch.sigmoid(pos)) - torch.log(1 - torch.sigmoid(neg))).mean()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)


def test_multi_supervision_on_a_one_block_student_is_a_config_error():
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in LOSS_DEFAULTS.items()}
    cfg["alignment"].update(enabled=True, multi_supervision_weight=0.1)
    student = GRU4Rec(GRU4RecConfig(num_items=30, hidden_size=8, max_len=5))
    with pytest.raises(ValueError, match="gru4rec has 1 block: set it to 0"):
        DistillationObjective(student, cfg, MANIFEST, torch.randn(31, 12), block_dims=[8])
