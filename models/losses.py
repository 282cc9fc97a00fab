"""Distillation and next-item losses. Each returns one value per row ([M]) unless said otherwise;
the caller averages and weighs them (weights live in the job config).

Rows are the positions that have a target (and teacher outputs): M = sum of target positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recdistill.models.scoring import catalogue_cross_entropy, catalogue_logsumexp


def next_item_ce(
    user_reps: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor, chunk_size: int = 8192
) -> torch.Tensor:
    """Full-catalogue softmax cross-entropy (chunked: memory M x chunk, not M x N)."""
    return catalogue_cross_entropy(user_reps, item_table, targets, chunk_size)


def next_item_bce(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """DLLM2Rec code's objective: -log sigmoid(s_pos) - log(1 - sigmoid(s_neg)), one negative a row."""
    return F.softplus(-pos_scores) + F.softplus(neg_scores)


def ranking_weights(
    confidence: torch.Tensor,  # [M, K] teacher's confidence per candidate (-log p: lower = surer)
    in_student_topk: torch.Tensor,  # [M, K] bool: candidate is also in the student's own top-K
    mix: tuple[float, float, float] = (0.3, 0.5, 0.1),
    position_lambda: float = 1.0,
) -> torch.Tensor:
    """DLLM2Rec's importance weights of the teacher's top-K candidates, [M, K], rows sum to 1.

    w_p = exp(-rank / lambda) (rank 0 = teacher's best), w_c = exp(-confidence), w_o = 1 for
    candidates the student also ranks in its top-K; each normalised over K, then mixed and
    normalised again.
    """
    k = confidence.shape[1]
    ranks = torch.arange(k, dtype=torch.float32, device=confidence.device)
    w_p = torch.softmax(-ranks / position_lambda, dim=0).expand_as(confidence)
    w_c = torch.softmax(-confidence.float(), dim=1)  # exp(-c) normalised
    w_o = in_student_topk.float()
    w_o = w_o / w_o.sum(1, keepdim=True).clamp(min=1.0)
    mixed = mix[0] * w_p + mix[1] * w_c + mix[2] * w_o
    return mixed / mixed.sum(1, keepdim=True)


def ranking_distillation(
    cand_scores: torch.Tensor, neg_scores: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """sum_k w_k [-log sigmoid(s_cand_k) - log(1 - sigmoid(s_neg_k))], [M].

    The reference code writes log(sigmoid(1 - s_neg)); the correct negative term is
    log(1 - sigmoid(s_neg)) = log sigmoid(-s_neg), which is what this computes.
    """
    per_candidate = F.softplus(-cand_scores) + F.softplus(neg_scores)
    return (weights.detach() * per_candidate).sum(1)


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
    student_states: torch.Tensor, teacher_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLMRec's terms per row: 1 - cos(student, teacher) and the mean squared difference, [M] each.

    The squared term is averaged over the hidden size (not summed) so that its scale does not
    grow with the teacher's width.
    """
    cosine = 1.0 - F.cosine_similarity(student_states.float(), teacher_states.float(), dim=-1)
    squared = (student_states.float() - teacher_states.float()).pow(2).mean(-1)
    return cosine, squared


class CollaborativeEmbedding(nn.Module):
    """DLLM2Rec's collaborative embedding distillation: the teacher's (frozen) item table,
    projected to the student's width, added to the student's item embeddings with a weight."""

    def __init__(self, teacher_table: torch.Tensor, student_dim: int, weight: float = 0.3):
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
