"""Each loss against a hand-computed case; the objective computes exactly the switched-on terms."""

from __future__ import annotations

import math

import pytest
import torch

from recdistill.models.distillation import LOSS_DEFAULTS, DistillationObjective, default_pairs
from recdistill.models.gru4rec import GRU4Rec, GRU4RecConfig
from recdistill.models.losses import (
    CollaborativeEmbedding,
    dros_catalogue_term,
    dros_loss,
    feature_alignment,
    item_propensity,
    next_item_bce,
    ranking_distillation,
    ranking_weights,
    sample_negatives,
    softmax_ranking_distillation,
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


def test_ranking_weights_hand_worked_official_raw_consistency():
    # DLLM2Rec main.py: w_rank = exp(-r) normalised (r = 1..K), w_conf = exp(-c) + 1e-8 normalised,
    # w_com = 1{in student's top-K} + 1e-8 *not* normalised; mixed and normalised.
    confidence = torch.tensor([[0.0, 1.0, 2.0]])
    in_top = torch.tensor([[True, True, False]])
    w = ranking_weights(confidence, in_top, (0.3, 0.5, 0.1), position_lambda=1.0)
    ranks = [math.exp(-r) for r in (1, 2, 3)]
    conf = [math.exp(-c) + 1e-8 for c in (0.0, 1.0, 2.0)]
    com = [1 + 1e-8, 1 + 1e-8, 1e-8]
    mixed = [
        0.3 * ranks[i] / sum(ranks) + 0.5 * conf[i] / sum(conf) + 0.1 * com[i] for i in range(3)
    ]
    assert w[0].tolist() == pytest.approx([m / sum(mixed) for m in mixed], rel=1e-6)
    # the "normalized" option divides the indicator by the overlap count (2 here): other weights
    normalized = ranking_weights(confidence, in_top, (0.3, 0.5, 0.1), 1.0, "normalized")
    mixed_n = [
        0.3 * ranks[i] / sum(ranks) + 0.5 * conf[i] / sum(conf) + 0.1 * [0.5, 0.5, 0][i]
        for i in range(3)
    ]
    assert normalized[0].tolist() == pytest.approx([m / sum(mixed_n) for m in mixed_n], rel=1e-6)
    assert not torch.allclose(w, normalized)


def test_ranking_distillation_official_and_corrected_negative_terms():
    cand, weights = torch.tensor([[1.0, -0.5]]), torch.tensor([[0.75, 0.25]])
    shared = torch.tensor([[0.2]])  # the code: one negative per row for every candidate
    official = ranking_distillation(cand, shared, weights).item()
    expected = sum(
        w * (-math.log(sigmoid(c)) - math.log(sigmoid(1 - 0.2)))
        for c, w in zip([1.0, -0.5], [0.75, 0.25])
    )
    assert official == pytest.approx(expected, rel=1e-6)
    corrected = ranking_distillation(cand, shared, weights, "corrected").item()
    expected = sum(
        w * (-math.log(sigmoid(c)) - math.log(1 - sigmoid(0.2)))
        for c, w in zip([1.0, -0.5], [0.75, 0.25])
    )
    assert corrected == pytest.approx(expected, rel=1e-6)
    per_candidate = ranking_distillation(cand, torch.tensor([[0.2, 3.0]]), weights, "corrected")
    expected = 0.75 * (-math.log(sigmoid(1.0)) - math.log(1 - sigmoid(0.2))) + 0.25 * (
        -math.log(sigmoid(-0.5)) - math.log(1 - sigmoid(3.0))
    )
    assert per_candidate.item() == pytest.approx(expected, rel=1e-6)


def test_softmax_ranking_form_hand_worked():
    # a catalogue of 3 items scored [2, 0, -1]; candidates items 1 and 3 with weights 0.75 / 0.25
    scores = [2.0, 0.0, -1.0]
    lse = math.log(sum(math.exp(x) for x in scores))
    value = softmax_ranking_distillation(
        torch.tensor([[2.0, -1.0]]), torch.tensor([lse]), torch.tensor([[0.75, 0.25]])
    )
    expected = 0.75 * -math.log(math.exp(2.0) / math.exp(lse)) + 0.25 * -math.log(
        math.exp(-1.0) / math.exp(lse)
    )
    assert value.item() == pytest.approx(expected, rel=1e-6)


def official_dros(model_output, ps, target, beta):
    """DLLM2Rec main.py's DROS lines, literally (model_output [B, N], target [B, 1])."""
    pos_scores_dro = torch.gather(torch.mul(model_output * model_output, ps), 1, target).squeeze(1)
    pos_loss_dro = torch.gather(
        torch.mul((model_output - 1) * (model_output - 1), ps), 1, target
    ).squeeze(1)
    inner_dro = (
        torch.sum(torch.exp(torch.mul(model_output * model_output, ps) / beta), 1)
        - torch.exp(pos_scores_dro / beta)
        + torch.exp(pos_loss_dro / beta)
    )
    return torch.log(inner_dro + 1e-24)


@pytest.mark.parametrize("chunk_size", [3, 100])
def test_dros_matches_the_official_formula(chunk_size):
    torch.manual_seed(0)
    reps = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    table = torch.randn(11, 6, dtype=torch.float64) * 0.5  # items 1..10 and padding
    counts = torch.tensor([0, 5, 0, 1, 2, 9, 3, 0, 0, 4, 1])
    ps = item_propensity(counts).double()
    # the code's propensity: (pop + 1) / sum, to the power 0.05, over the real items
    smoothed = counts[1:].double() + 1
    torch.testing.assert_close(ps[1:], (smoothed / smoothed.sum()) ** 0.05, rtol=1e-6, atol=0)
    targets = torch.tensor([1, 4, 10, 7])
    catalogue = dros_catalogue_term(reps, table, ps, 2.0, chunk_size)
    scores = reps @ table.T
    value = dros_loss(catalogue, scores.gather(1, targets[:, None])[:, 0], ps[targets], 2.0)
    # official: model_output has one column per real item (ours: column j = item j + 1)
    expected = official_dros(scores[:, 1:], ps[1:], targets[:, None] - 1, 2.0)
    torch.testing.assert_close(value, expected)
    grad = torch.autograd.grad(value.sum(), reps, retain_graph=True)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), reps)[0])


def test_sample_negatives_never_draws_excluded_items_and_covers_the_rest():
    torch.manual_seed(0)
    excluded = torch.tensor([[3, 3, 0, 1, 7], [10, 9, 8, 7, 6], [2, 2, 2, 2, 2]])
    draws = sample_negatives(10, excluded, count=4000)  # [3, 4000]
    for row, banned in enumerate(({1, 3, 7}, {6, 7, 8, 9, 10}, {2})):
        allowed = set(range(1, 11)) - banned
        values, counts = draws[row].unique(return_counts=True)
        assert set(values.tolist()) == allowed  # every allowed id, nothing else
        share = counts.double() / counts.sum()
        assert (share - 1 / len(allowed)).abs().max() < 0.03  # uniform
    only_one = sample_negatives(4, torch.tensor([[1, 2, 4]]), count=50)
    assert only_one.unique().tolist() == [3]


def test_objective_negatives_exclude_target_and_history_up_to_the_position():
    objective, cfg = objective_with(negatives={"exclude": ["target", "history"]})
    batch = fake_batch(num_items=8)  # histories of 5 among 8 items: many collisions otherwise
    ids, at = batch["item_ids"], batch["target_positions"]
    for _ in range(20):
        negatives = objective._negatives(batch, 3)
        for m in range(len(at)):
            row, position = int(at[m]) // 5, int(at[m]) % 5
            banned = set(ids[row, : position + 1].tolist()) | {int(batch["targets"][m])}
            assert not banned & set(negatives[m].tolist())
    objective.cfg["negatives"] = {"exclude": ["target", "history", "candidates"]}
    batch = fake_batch(num_items=30)
    negatives = objective._negatives(batch, 8)
    for m in range(len(at)):
        assert not set(batch["teacher_topk_ids"][m, :10].tolist()) & set(negatives[m].tolist())


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
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 3.0]])
    cosine, distance = feature_alignment(student, teacher)  # SLMRec: torch.norm(s - t, p=2)
    assert cosine.item() == pytest.approx(1 - 1 / math.sqrt(10))
    assert distance.item() == pytest.approx(3.0)
    _, mean_square = feature_alignment(student, teacher, "mean_square")
    assert mean_square.item() == pytest.approx(4.5)


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
        "hidden_1": torch.randn(3, 1, hidden),
        "hidden_2": torch.randn(3, 1, hidden),
    }


MANIFEST = {
    "hidden_layers": [1, 2],
    "hidden_size": 16,
    "teacher_layers": 2,
    "temperatures": [1.0],
}


def objective_with(**switches):
    cfg = {
        key: (dict(value) if isinstance(value, dict) else value)
        for key, value in LOSS_DEFAULTS.items()
    }
    for name, updates in switches.items():
        cfg[name].update(updates)
    student = SASRec(SASRecConfig(num_items=30, hidden_size=8, num_blocks=2, max_len=5))
    counts = torch.randint(0, 5, (31,))
    return DistillationObjective(
        student, cfg, MANIFEST, torch.randn(31, 12), block_dims=[8, 8], target_counts=counts
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
        ({"ranking": {"enabled": True, "k": 4, "form": "softmax"}}, {"next_item", "ranking"}),
        ({"embedding": {"enabled": True}}, {"next_item"}),
        ({"dros": {"enabled": True}}, {"next_item", "dros"}),
        (
            {"dros": {"enabled": True}, "ranking": {"enabled": True, "k": 4}},
            {"next_item", "dros", "ranking"},
        ),
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


@pytest.mark.parametrize("next_item", ["ce", "bce"])
def test_softmax_ranking_form_weights_the_catalogue_cross_entropy_of_each_candidate(next_item):
    # CE students reuse their CE's log-sum-exp, BCE students compute it: the same term either way
    objective, cfg = objective_with(ranking={"enabled": True, "k": 4, "form": "softmax"})
    cfg["next_item"] = next_item
    objective.eval()
    batch = fake_batch()
    term = objective(batch)["ranking"]
    out, table = objective.encode(batch["item_ids"], batch["lengths"])
    reps = out.user_reps.flatten(0, 1)[batch["target_positions"]]
    log_softmax = torch.log_softmax(reps @ table[1:].T, dim=-1)  # [M, N] items 1..N
    candidates = batch["teacher_topk_ids"][:, :4]
    own_top = (reps @ table[1:].T).topk(4).indices + 1
    confidence = batch["teacher_logsumexp"][:, :1] - batch["teacher_topk_scores"][:, :4].float()
    weights = ranking_weights(confidence, (candidates[:, :, None] == own_top[:, None]).any(-1))
    expected = -(weights * log_softmax.gather(1, candidates - 1)).sum(1).mean()
    torch.testing.assert_close(term, cfg["ranking"]["weight"] * expected)


def test_reliability_keeps_only_rows_where_the_teacher_knows_the_target_better():
    objective, cfg = objective_with(
        ranking={"enabled": True, "k": 4}, logits={"enabled": True}, alignment={"enabled": True}
    )
    objective.eval()
    batch = fake_batch()
    torch.manual_seed(0)  # the same sampled negatives in every pass
    everything = objective(batch)
    out, table = objective.encode(batch["item_ids"], batch["lengths"])
    reps = out.user_reps.flatten(0, 1)[batch["target_positions"]]
    student_logprob = -torch.nn.functional.cross_entropy(
        reps @ table[1:].T, batch["targets"] - 1, reduction="none"
    )
    # the teacher beats the student on rows 0-6 only
    batch["teacher_target_logprob"] = student_logprob.detach() + torch.where(
        torch.arange(15) < 7, 1.0, -1.0
    )
    objective.cfg["reliability"] = "teacher_beats_student"
    torch.manual_seed(0)
    filtered = objective(batch)
    assert filtered["next_item"] == everything["next_item"]
    for term in ("ranking", "logits", "align_cos", "align_l2"):
        assert 0 < filtered[term] < everything[term]
    # hidden states are stored at position 4 of each row (target rows 4, 9, 14): only row 0's
    # is reliable, so the alignment keeps its terms and counts the other two as 0
    keep_row_0 = objective._at_hidden(batch, (torch.arange(15) < 7).float())
    assert keep_row_0.tolist() == [[1.0], [0.0], [0.0]]
    batch["teacher_target_logprob"] = (
        student_logprob.detach() - 1.0
    )  # the teacher trails everywhere
    nothing = objective(batch)
    for term in ("ranking", "logits", "align_cos", "align_l2"):
        assert nothing[term] == 0


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
    # a term loss.reliability may switch off is 0 by right, but still checked for NaN
    LossWatch(["ranking"], 3, may_be_zero=("ranking",)).update({"ranking": 0.0}, 3)
    with pytest.raises(RuntimeError, match="nan"):
        LossWatch(["ranking"], 3, may_be_zero=("ranking",)).update({"ranking": float("nan")}, 3)


def test_bce_next_item_switch():
    objective, _ = objective_with()
    objective.cfg = {**objective.cfg, "next_item": "bce"}
    objective.eval()  # no dropout: the recomputation below draws its negatives first
    batch = fake_batch()
    torch.manual_seed(5)
    value = objective(batch)["next_item"]
    # recompute with the same negatives: the mean of -log s(pos) - log(1 - s(neg)) over positions
    torch.manual_seed(5)
    negatives = objective._negatives(batch, 1)[:, 0]
    out, table = objective.encode(batch["item_ids"], batch["lengths"])
    reps, targets = out.user_reps.flatten(0, 1)[batch["target_positions"]], batch["targets"]
    pos, neg = (reps * table[targets]).sum(-1), (reps * table[negatives]).sum(-1)
    expected = (-torch.log(torch.sigmoid(pos)) - torch.log(1 - torch.sigmoid(neg))).mean()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)


def test_alignment_sums_blocks_and_heads_sit_at_aligned_blocks_bias_free():
    objective, cfg = objective_with(alignment={"enabled": True, "multi_supervision_weight": 1.0})
    assert objective.pairs == {1: 1, 2: 2}
    assert list(objective.heads) == ["1"]  # aligned blocks but the last (the output)
    assert objective.heads["1"].bias is None
    objective.eval()  # no dropout: two passes give the same states
    batch = fake_batch()
    summed = objective(batch)
    objective.cfg["alignment"] = {**cfg["alignment"], "reduction": "mean"}
    averaged = objective(batch)
    torch.testing.assert_close(summed["align_cos"], 2 * averaged["align_cos"])
    torch.testing.assert_close(summed["align_l2"], 2 * averaged["align_l2"])
    # by hand: sum over blocks of the masked means of ||P s - t||_2, times l2_weight
    out, _ = objective.encode(batch["item_ids"], batch["lengths"])
    rows = torch.arange(3)[:, None]
    expected = sum(
        (
            objective.aligners[str(block)](
                out.block_states[block - 1][rows, batch["hidden_positions"]]
            )
            - batch[f"hidden_{layer}"]
        )
        .norm(dim=-1)
        .mean()
        for block, layer in {1: 1, 2: 2}.items()
    )
    torch.testing.assert_close(summed["align_l2"], 0.1 * expected)


def test_collaborative_embedding_fuses_the_input_and_scores_with_the_students_table():
    objective, _ = objective_with(embedding={"enabled": True})
    student_table = objective.student.item_table()
    assert objective.item_table() is student_table  # the code scores with its own layer
    _, table = objective.encode(torch.tensor([[1, 2]]), torch.tensor([2]))
    assert table is student_table
    objective.cfg["embedding"] = {**objective.cfg["embedding"], "fuse": "input_and_scoring"}
    torch.testing.assert_close(objective.item_table(), objective.collaborative(student_table))
    # the input differs from the plain student's: the fused table feeds the sequence
    objective.eval()
    fused_out, _ = objective.encode(torch.tensor([[1, 2]]), torch.tensor([2]))
    plain_out = objective.student(torch.tensor([[1, 2]]), torch.tensor([2]))
    assert not torch.allclose(fused_out.user_reps, plain_out.user_reps)


def test_multi_supervision_on_a_one_block_student_is_a_config_error():
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in LOSS_DEFAULTS.items()}
    cfg["alignment"].update(enabled=True, multi_supervision_weight=0.1)
    student = GRU4Rec(GRU4RecConfig(num_items=30, hidden_size=8, max_len=5))
    with pytest.raises(ValueError, match="gru4rec has 1 block.*set it to 0"):
        DistillationObjective(student, cfg, MANIFEST, torch.randn(31, 12), block_dims=[8])
