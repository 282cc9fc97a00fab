"""Scoring user representations against a whole item catalogue, in chunks.

A catalogue of millions of items makes B x N float32 scores the largest tensor of a step. Every
function here walks the catalogue in chunks of `chunk_size` rows, so memory is B x chunk_size.

Conventions: `item_table` is [N + 1, D] with row 0 the padding item, which never gets a score
(it is masked to -inf); targets and returned ids are item ids 1..N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)  # bf16/fp16 scores are summed in fp32


def _chunk_scores(
    user_reps: torch.Tensor, item_table: torch.Tensor, start: int, end: int
) -> torch.Tensor:
    dtype = _compute_dtype(user_reps)
    scores = user_reps.to(dtype) @ item_table[start:end].to(dtype).T  # [M, end - start]
    if start == 0:
        scores[:, 0] = float("-inf")  # padding item
    return scores


def full_scores(user_reps: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
    """[M, N + 1] scores of every item (padding column -inf), for inference on small catalogues."""
    return _chunk_scores(user_reps, item_table, 0, item_table.shape[0])


class _CatalogueCrossEntropy(torch.autograd.Function):
    """Per-row softmax cross-entropy over the whole catalogue without storing M x N logits.

    With more than one chunk, the backward pass recomputes each chunk's softmax and only the
    inputs are saved (the item table as the tensor that was passed, never a slice), which keeps
    this safe under ZeRO-3, where a parameter's storage is swapped between forward and backward.
    A catalogue that fits in one chunk keeps that chunk's softmax for the backward pass instead
    (M x chunk floats, the bound `chunk_size` sets, now held from forward to backward), which
    saves backward an M x N matmul and exp (a CPU SASRec student job 29% shorter, README). The gradients
    are bit-identical to the recomputed ones: the same ops on the same inputs.
    """

    @staticmethod
    def forward(ctx, user_reps, item_table, targets, chunk_size):
        n_rows, dtype = item_table.shape[0], _compute_dtype(user_reps)
        target_scores = (user_reps.to(dtype) * item_table[targets].to(dtype)).sum(-1)
        ctx.chunk_size = chunk_size
        if n_rows <= chunk_size:  # one chunk: keep its softmax (the scores' own storage)
            scores = _chunk_scores(user_reps, item_table, 0, n_rows)
            logsumexp = torch.logsumexp(scores, dim=1)
            probs = scores.sub_(logsumexp[:, None]).exp_()  # [M, N + 1]
            ctx.save_for_backward(user_reps, item_table, targets, logsumexp, probs)
            return logsumexp - target_scores
        logsumexp = torch.full(
            (user_reps.shape[0],), float("-inf"), dtype=dtype, device=user_reps.device
        )
        for start in range(0, n_rows, chunk_size):
            chunk = _chunk_scores(user_reps, item_table, start, min(start + chunk_size, n_rows))
            logsumexp = torch.logaddexp(logsumexp, torch.logsumexp(chunk, dim=1))
        ctx.save_for_backward(user_reps, item_table, targets, logsumexp)
        return logsumexp - target_scores

    @staticmethod
    def backward(ctx, grad_loss):
        user_reps, item_table, targets, logsumexp, *kept_probs = ctx.saved_tensors
        dtype = _compute_dtype(user_reps)
        grad_loss = grad_loss.to(dtype)
        need_user, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_user = torch.zeros(user_reps.shape, dtype=dtype, device=user_reps.device)
        grad_table = (
            torch.zeros(item_table.shape, dtype=dtype, device=item_table.device)
            if need_table
            else None
        )
        n_rows = item_table.shape[0]
        for start in range(0, n_rows, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n_rows)
            if kept_probs:
                probs = kept_probs[0]
            else:
                scores = _chunk_scores(user_reps, item_table, start, end)
                probs = torch.exp(scores - logsumexp[:, None])
            probs = probs * grad_loss[:, None]  # d loss / d scores, softmax part
            if need_user:
                grad_user += probs @ item_table[start:end].to(dtype)
            if need_table:
                grad_table[start:end] += probs.T @ user_reps.to(dtype)
        # the -target_score part of the loss
        if need_user:
            grad_user -= grad_loss[:, None] * item_table[targets].to(dtype)
        if need_table:
            grad_table.index_add_(0, targets, -grad_loss[:, None] * user_reps.to(dtype))
            grad_table = grad_table.to(item_table.dtype)
        return grad_user.to(user_reps.dtype) if need_user else None, grad_table, None, None


def catalogue_cross_entropy(
    user_reps: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor, chunk_size: int = 8192
) -> torch.Tensor:
    """Per-row full-catalogue cross-entropy, [M]; equals `F.cross_entropy(u @ E.T, t, reduction='none')`
    with the padding column excluded."""
    return _CatalogueCrossEntropy.apply(user_reps, item_table, targets, chunk_size)


def catalogue_logsumexp(
    user_reps: torch.Tensor, item_table: torch.Tensor, chunk_size: int = 8192
) -> torch.Tensor:
    """Differentiable log-sum-exp of each row's scores over the whole catalogue, [M], in chunks.

    Cross-entropy is lse - target score, so lse = CE(target=1) + score of item 1.
    """
    ones = torch.ones(user_reps.shape[0], dtype=torch.long, device=user_reps.device)
    target_scores = (user_reps * item_table[1]).sum(-1)
    return catalogue_cross_entropy(user_reps, item_table, ones, chunk_size) + target_scores


@dataclass
class CatalogueStats:
    """What one pass over the catalogue yields for each row."""

    topk_scores: torch.Tensor  # [M, K] float32, descending
    topk_ids: torch.Tensor  # [M, K] int64 item ids 1..N
    logsumexp: torch.Tensor  # [M, len(temperatures)] logsumexp(scores / T) over the catalogue
    target_scores: torch.Tensor | None  # [M]
    # [M] float: items scoring higher than the target, plus half of those tying with it (the
    # expected rank under a random tie-break: an all-equal model ranks a target mid-catalogue)
    target_ranks: torch.Tensor | None


def tie_aware_count(scores: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """Per row: #scores above the target's + half #scores equal to it, float64 [M].

    Counting only strictly higher scores ranks ties optimistically: a model whose scores are all
    equal would put every target first (HR@1 = 1) and early stopping could pick it."""
    above = (scores > target_scores[:, None]).sum(1, dtype=torch.float64)
    ties = (scores == target_scores[:, None]).sum(1, dtype=torch.float64)
    return above + 0.5 * ties


@torch.no_grad()
def _add_chunk_logsumexp(
    logsumexp: torch.Tensor, scores: torch.Tensor, temperature: float, in_place: bool
) -> None:
    """logsumexp <- logaddexp(logsumexp, logsumexp(scores / T)) with a single exp pass; `in_place`
    lets it overwrite `scores` (the last use of the chunk) instead of allocating."""
    chunk_max = scores.amax(dim=1)
    chunk_max = torch.where(torch.isfinite(chunk_max), chunk_max, torch.zeros_like(chunk_max))
    work = scores if in_place else scores.clone()
    work.sub_(chunk_max[:, None]).div_(temperature).exp_()
    logsumexp.copy_(
        torch.logaddexp(logsumexp, chunk_max / temperature + torch.log(work.sum(dim=1)))
    )


def catalogue_stats(
    user_reps: torch.Tensor,
    item_table: torch.Tensor,
    k: int = 0,
    targets: torch.Tensor | None = None,
    temperatures: tuple[float, ...] = (),
    chunk_size: int = 8192,
    exclude: torch.Tensor | None = None,
    rank_targets: bool = True,
) -> CatalogueStats:
    """Running top-K, log-sum-exp per temperature and target rank in one chunked pass.

    `rank_targets=False` skips the ranks when only the targets' scores are wanted. `exclude`
    ([M, L] item ids, 0 = none) masks items (e.g. a user's history) out of the top-K and the rank;
    the log-sum-exp always covers the whole catalogue.
    """
    n_rows, m, device = item_table.shape[0], user_reps.shape[0], user_reps.device
    dtype = _compute_dtype(user_reps)
    top_scores = torch.full((m, 0), float("-inf"), dtype=dtype, device=device)
    top_ids = torch.zeros((m, 0), dtype=torch.long, device=device)
    logsumexp = torch.full((m, len(temperatures)), float("-inf"), dtype=dtype, device=device)
    target_scores = ranks = None
    if targets is not None:
        target_scores = (user_reps.to(dtype) * item_table[targets].to(dtype)).sum(-1)
        ranks = torch.zeros(m, dtype=torch.float64, device=device) if rank_targets else None
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        scores = _chunk_scores(user_reps, item_table, start, end)
        masked = scores
        if exclude is not None:
            masked = scores.clone()  # the log-sum-exp still needs every item
            inside = (exclude >= start) & (exclude < end) & (exclude > 0)
            rows, cols = inside.nonzero(as_tuple=True)
            masked[rows, exclude[rows, cols] - start] = float("-inf")
        if ranks is not None:
            ranks += tie_aware_count(masked, target_scores)
            # The target's own column is computed by a matmul, `target_scores` elementwise: they
            # may differ in the last bit, and the target must never outrank (or tie) itself.
            inside = (targets >= start) & (targets < end)
            rows = inside.nonzero(as_tuple=True)[0]
            own = masked[rows, targets[rows] - start][:, None]
            ranks[rows] -= tie_aware_count(own, target_scores[rows])
        if k:
            take = min(k, end - start)
            chunk_top, chunk_idx = masked.topk(take, dim=1)
            merged_scores = torch.cat([top_scores, chunk_top], dim=1)
            merged_ids = torch.cat([top_ids, chunk_idx + start], dim=1)
            keep = min(k, merged_scores.shape[1])
            top_scores, order = merged_scores.topk(keep, dim=1)
            top_ids = merged_ids.gather(1, order)
        for t, temperature in enumerate(temperatures):  # last: the chunk is not needed any more
            _add_chunk_logsumexp(
                logsumexp[:, t], scores, temperature, in_place=t == len(temperatures) - 1
            )
    return CatalogueStats(top_scores, top_ids, logsumexp, target_scores, ranks)
