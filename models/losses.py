"""Distillation and next-item losses. Each returns one value per row ([M]) unless said otherwise;
the caller averages and weighs them (weights live in the job config).

Rows are the positions that have a target (and teacher outputs): M = sum of target positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from recdistill.models.scoring import catalogue_cross_entropy, catalogue_logsumexp


def next_item_ce(
    user_reps: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor, chunk_size: int = 8192
) -> torch.Tensor:
    """Full-catalogue softmax cross-entropy (chunked: memory M x chunk, not M x N)."""
    return catalogue_cross_entropy(user_reps, item_table, targets, chunk_size)


def next_item_bce(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """DLLM2Rec code's objective: -log sigmoid(s_pos) - log(1 - sigmoid(s_neg)), one negative a row."""
    return F.softplus(-pos_scores) + F.softplus(neg_scores)


def sample_negatives(num_items: int, excluded: torch.Tensor, count: int = 1) -> torch.Tensor:
    """[M, count] item ids drawn uniformly from 1..N minus each row's `excluded` ids.

    excluded: [M, X] ids (0 = none; repeats allowed), fewer than N distinct per row. Exact and
    on the device with no host sync: the u-th allowed id is u + #{j : e_j - j < u} over the row's
    sorted distinct excluded ids e_1 < e_2 < ... (j from 1), as e_j - j items below e_j are allowed.
    DLLM2Rec's code draws from the same set with torch.multinomial over an [M, N] mask.
    """
    beyond = num_items + 1
    ids = torch.where(excluded > 0, excluded, beyond).sort(dim=1).values
    repeats = torch.zeros_like(ids, dtype=torch.bool)
    repeats[:, 1:] = ids[:, 1:] == ids[:, :-1]
    ids = torch.where(repeats, beyond, ids).sort(dim=1).values  # distinct ids first, then N + 1
    distinct = ids <= num_items
    order = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    allowed_below = torch.where(distinct, ids - order, beyond)  # [M, X]
    allowed = num_items - distinct.sum(1, keepdim=True)  # [M, 1]
    u = (torch.rand(ids.shape[0], count, device=ids.device) * allowed).long().clamp(
        max=allowed - 1
    ) + 1
    return u + (allowed_below[:, None, :] < u[:, :, None]).sum(-1)


def ranking_weights(
    confidence: torch.Tensor,  # [M, K] teacher's confidence per candidate (-log p: lower = surer)
    in_student_topk: torch.Tensor,  # [M, K] bool: candidate is also in the student's own top-K
    mix: tuple[float, float, float] = (0.3, 0.5, 0.1),
    position_lambda: float = 1.0,
    consistency: str = "raw",
) -> torch.Tensor:
    """DLLM2Rec's importance weights of the teacher's top-K candidates, [M, K], rows sum to 1.

    As its main.py: w_p = exp(-rank / lambda) normalised over K (rank 1 = teacher's best),
    w_c = exp(-confidence) + 1e-8 normalised, w_o = 1{candidate in the student's top-K} + 1e-8
    *not* normalised (consistency="raw"); mixed with `mix` and normalised again.
    consistency="normalized" divides w_o by the overlap count like the other two (up to K times
    weaker: a deviation, kept as an option).
    """
    k = confidence.shape[1]
    ranks = torch.arange(1, k + 1, dtype=torch.float32, device=confidence.device)
    w_p = torch.softmax(-ranks / position_lambda, dim=0).expand_as(confidence)
    w_c = torch.exp(-confidence.float()) + 1e-8
    w_c = w_c / w_c.sum(1, keepdim=True)
    w_o = in_student_topk.float()
    if consistency == "raw":
        w_o = w_o + 1e-8
    elif consistency == "normalized":
        w_o = w_o / w_o.sum(1, keepdim=True).clamp(min=1.0)
    else:
        raise ValueError(f"loss.ranking.consistency {consistency!r}: use raw or normalized")
    mixed = mix[0] * w_p + mix[1] * w_c + mix[2] * w_o
    return mixed / mixed.sum(1, keepdim=True)


def ranking_distillation(
    cand_scores: torch.Tensor,  # [M, K] student scores of the teacher's candidates
    neg_scores: torch.Tensor,  # [M, 1] (one negative shared by the K candidates) or [M, K]
    weights: torch.Tensor,  # [M, K]
    negative_term: str = "official",
) -> torch.Tensor:
    """sum_k w_k [-log sigmoid(s_cand_k) + negative term], [M].

    negative_term="official": DLLM2Rec's main.py writes -log(sigmoid(1 - s_neg)) =
    softplus(s_neg - 1), a shifted margin on the negative; "corrected": -log(1 - sigmoid(s_neg))
    = softplus(s_neg), the binary cross-entropy its paper writes.
    """
    if negative_term == "official":
        negative = F.softplus(neg_scores - 1.0)
    elif negative_term == "corrected":
        negative = F.softplus(neg_scores)
    else:
        raise ValueError(f"loss.ranking.negative_term {negative_term!r}: use official or corrected")
    per_candidate = F.softplus(-cand_scores) + negative
    return (weights.detach() * per_candidate).sum(1)


def softmax_ranking_distillation(
    cand_scores: torch.Tensor,  # [M, K] student scores of the teacher's candidates
    student_lse: torch.Tensor,  # [M] the student's log-sum-exp over the whole catalogue
    weights: torch.Tensor,  # [M, K]
) -> torch.Tensor:
    """sum_k w_k [-log softmax(s)_cand_k], [M]: the ranking term in a CE student's own loss.

    DLLM2Rec writes the term in its students' training loss (BCE with a sampled negative); for a
    student trained with the catalogue softmax the same importance weights become soft labels of
    that softmax, so a candidate is raised against every item, not against one negative.
    """
    return (weights.detach() * (student_lse[:, None] - cand_scores)).sum(1)


def item_propensity(target_counts: torch.Tensor) -> torch.Tensor:
    """DROS's per-item propensity from training-target counts [N + 1] (index 0 = padding):
    ((count + 1) / sum) ** 0.05, as DLLM2Rec's calcu_propensity_score."""
    smoothed = target_counts.double() + 1.0
    return (smoothed / smoothed[1:].sum()).pow(0.05).float()


def dros_catalogue_term(
    user_reps: torch.Tensor,
    item_table: torch.Tensor,
    propensity: torch.Tensor,
    beta: float,
    chunk_size: int = 8192,
) -> torch.Tensor:
    """log sum_j exp(ps_j s_j^2 / beta) over items 1..N, [M], differentiable, in chunks (each
    chunk recomputed in backward, so memory stays M x chunk)."""
    parts = []
    for start in range(1, item_table.shape[0], chunk_size):
        end = min(start + chunk_size, item_table.shape[0])
        parts.append(
            checkpoint(
                _dros_chunk,
                user_reps,
                item_table[start:end],
                propensity[start:end],
                beta,
                use_reentrant=False,
            )
        )
    return torch.logsumexp(torch.stack(parts, dim=1), dim=1)


def _dros_chunk(user_reps, table_chunk, propensity_chunk, beta: float) -> torch.Tensor:
    dtype = torch.promote_types(user_reps.dtype, torch.float32)
    scores = user_reps.to(dtype) @ table_chunk.to(dtype).T
    return torch.logsumexp(scores.square() * propensity_chunk / beta, dim=1)


def dros_loss(
    catalogue_term: torch.Tensor,  # [M] from dros_catalogue_term
    target_scores: torch.Tensor,  # [M] or [M, K]
    target_propensity: torch.Tensor,  # same shape
    beta: float,
) -> torch.Tensor:
    """DLLM2Rec's DROS term (Yang et al. 2023) per row (and candidate):
    log(sum_j exp(ps_j s_j^2 / b) - exp(ps_t s_t^2 / b) + exp(ps_t (s_t - 1)^2 / b)).
    The code sums the exponentials directly (+1e-24); this is the same value in log space."""
    lse = catalogue_term if target_scores.dim() == 1 else catalogue_term[:, None]
    own = target_propensity * target_scores.square() / beta
    moved = target_propensity * (target_scores - 1.0).square() / beta
    top = torch.maximum(lse, moved)
    inner = torch.exp(lse - top) - torch.exp(own - top) + torch.exp(moved - top)
    return top + torch.log(inner.clamp(min=1e-30))


def topk_kl(
    student_cand_scores: torch.Tensor,  # [M, K] student scores of the teacher's top-K items
    teacher_topk_scores: torch.Tensor,  # [M, K]
    temperature: float,
    tail: str = "renormalize",
    teacher_logsumexp: torch.Tensor | None = None,  # [M] teacher's full-catalogue lse at this T
    student_logsumexp: torch.Tensor | None = None,  # [M] student's full-catalogue lse at this T
) -> torch.Tensor:
    """KL(teacher || student) restricted to the teacher's top-K, times T^2, [M].

    tail="renormalize": both distributions renormalised over the K candidates.
    tail="bucket": K + 1 outcomes, the K candidates and "any other item", with the exact
    full-catalogue probabilities (the teacher's from its stored log-sum-exp).
    """
    t_scaled = teacher_topk_scores.float() / temperature
    s_scaled = student_cand_scores.float() / temperature
    if tail == "renormalize":
        t_logp = torch.log_softmax(t_scaled, dim=1)
        s_logp = torch.log_softmax(s_scaled, dim=1)
    elif tail == "bucket":
        if teacher_logsumexp is None or student_logsumexp is None:
            raise ValueError("tail='bucket' needs both full-catalogue log-sum-exps")
        t_logp = _with_tail(t_scaled - teacher_logsumexp[:, None])
        s_logp = _with_tail(s_scaled - student_logsumexp[:, None])
    else:
        raise ValueError(f"tail {tail!r}: use renormalize or bucket")
    return (t_logp.exp() * (t_logp - s_logp)).sum(1) * temperature**2


def _with_tail(topk_logp: torch.Tensor) -> torch.Tensor:
    """Append log(1 - sum p_k) as the (K+1)-th outcome."""
    tail = torch.log1p(-topk_logp.exp().sum(1, keepdim=True).clamp(max=1 - 1e-6))
    return torch.cat([topk_logp, tail], dim=1)


def student_logsumexp(
    user_reps: torch.Tensor, item_table: torch.Tensor, temperature: float, chunk_size: int
) -> torch.Tensor:
    return catalogue_logsumexp(user_reps / temperature, item_table, chunk_size)


def feature_alignment(
    student_states: torch.Tensor, teacher_states: torch.Tensor, distance: str = "norm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLMRec's terms per row: 1 - cos(student, teacher) and a distance, [M] each.

    distance="norm": the L2 distance ||s - t||_2 (SLMRec's train_utils.py, torch.norm p=2);
    "mean_square": mean over the hidden size of (s - t)^2, whose scale does not grow with the
    teacher's width (and whose gradient does not have unit length whatever the gap).
    """
    diff = student_states.float() - teacher_states.float()
    cosine = 1.0 - F.cosine_similarity(student_states.float(), teacher_states.float(), dim=-1)
    if distance == "norm":
        return cosine, diff.norm(p=2, dim=-1)
    if distance == "mean_square":
        return cosine, diff.pow(2).mean(-1)
    raise ValueError(f"loss.alignment.distance {distance!r}: use norm or mean_square")


class CollaborativeEmbedding(nn.Module):
    """DLLM2Rec's collaborative embedding distillation: the teacher's (frozen) item table,
    projected to the student's width (a linear layer with bias, its fc_4096_64), added to the
    student's item embeddings with a weight (ed_weight). Row 0 (padding) gets no offset."""

    def __init__(self, teacher_table: torch.Tensor, student_dim: int, weight: float = 0.2):
        super().__init__()
        self.register_buffer("teacher_table", teacher_table.float(), persistent=True)
        self.projection = nn.Linear(teacher_table.shape[1], student_dim)
        self.weight = weight

    def forward(self, student_table: torch.Tensor) -> torch.Tensor:
        offsets = self.projection(self.teacher_table) * self.weight
        offsets = (
            offsets * (torch.arange(offsets.shape[0], device=offsets.device) > 0)[:, None]
        )  # row 0 stays padding
        return student_table + offsets
