"""Full-ranking metrics from target ranks (0 = the target scored highest)."""

from __future__ import annotations

import math

import torch

HR_CUTOFFS = (1, 5, 10, 20)
NDCG_CUTOFFS = (5, 10, 20)


def metric_sums(ranks: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, float]:
    """Sums (not means) of HR@K, NDCG@K and reciprocal rank, plus the count, so that shards of
    an evaluation can be added across ranks before dividing."""
    ranks = ranks.double()
    weights = torch.ones_like(ranks) if weights is None else weights.double()
    sums = {f"hr@{k}": float(((ranks < k).double() * weights).sum()) for k in HR_CUTOFFS}
    gains = 1.0 / torch.log2(ranks + 2.0)
    for k in NDCG_CUTOFFS:
        sums[f"ndcg@{k}"] = float((gains * (ranks < k).double() * weights).sum())
    sums["mrr"] = float((weights / (ranks + 1.0)).sum())
    sums["count"] = float(weights.sum())
    return sums


def finalize(sums: dict[str, float]) -> dict[str, float]:
    count = sums["count"]
    if count == 0:
        return {key: math.nan for key in sums if key != "count"} | {"count": 0}
    return {key: value / count for key, value in sums.items() if key != "count"} | {
        "count": int(count)
    }


def add_sums(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    return {key: total.get(key, 0.0) + value for key, value in part.items()}
