"""Full-ranking evaluation shared by the jobs: the teacher's and the students' validation, the
evaluation CLI (trainer/evaluate.py) and the benchmarks.

HR@{1,5,10,20}, NDCG@{5,10,20} and MRR over all N items (padding excluded), optionally with each
user's whole history ranked out; SLMRec's 999-negative sampled protocol; inference speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recdistill.models.scoring import full_scores, tie_aware_count
from recdistill.trainer.data.batches import even_shard, pad_right, prefix_batch
from recdistill.trainer.metrics import finalize, metric_sums

RankFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor
]  # ids, lengths, targets, excluded ids ([B, S], 0 = none, or None) -> ranks


def eval_split(
    splits, split: str, max_len: int, exclude_history: bool = False
) -> tuple[list[tuple[list[int], int]], list | None]:
    """(last max_len history items, target) per user of a split, and, when the history is ranked
    out (--exclude-seen), each user's whole history before the target, else None."""
    histories = list(splits[split]["history"])  # one conversion from Arrow serves both
    examples = [
        (history[-max_len:], target) for history, target in zip(histories, splits[split]["target"])
    ]
    return examples, histories if exclude_history else None


def ranking_sums(
    rank_fn: RankFn,
    examples: list,
    batch_size: int,
    device,
    rank: int = 0,
    world: int = 1,
    seen: list | None = None,
) -> dict:
    """Metric sums of this rank's share; every rank runs the same number of batches (padding
    rows weigh 0), so a ZeRO-3 teacher never deadlocks. Add the sums over ranks, then finalize.
    `seen` (one item list per example): items ranked out, e.g. from `eval_split`."""
    indices, weights = even_shard(len(examples), world, rank, batch_size)
    totals: dict[str, float] = {}
    for start in range(0, len(indices), batch_size):
        rows = indices[start : start + batch_size]
        batch = prefix_batch(*zip(*[examples[i] for i in rows]))
        exclude = None if seen is None else pad_right([seen[i] for i in rows])[0].to(device)
        ranks = rank_fn(
            batch["item_ids"].to(device),
            batch["lengths"].to(device),
            batch["targets"].to(device),
            exclude,
        )
        part = metric_sums(ranks.cpu(), torch.from_numpy(weights[start : start + batch_size]))
        totals = {key: totals.get(key, 0.0) + value for key, value in part.items()}
    return totals


def all_reduce_sums(sums: dict, device) -> dict:
    import torch.distributed as dist

    keys = sorted(sums)
    packed = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed)
    return dict(zip(keys, packed.tolist()))


def popularity_metrics(
    train_items: list, examples: list, num_items: int, seen: list | None = None
) -> dict[str, float]:
    """Baseline: every user gets the same ranking, by training-set item frequency (minus the
    user's `seen` items when given, as `ranking_sums` does)."""
    counts = np.bincount(
        np.concatenate([np.asarray(s) for s in train_items]), minlength=num_items + 1
    ).astype(np.float64)
    counts[0] = -np.inf  # padding
    targets = np.asarray([t for _, t in examples])
    # Items of equal frequency tie: each counts half (scoring.tie_aware_count), the target not itself.
    ranks = _tie_aware_ranks(counts[None, 1:], counts[targets][:, None]) - 0.5
    if seen is not None:
        for row, (items, target) in enumerate(zip(seen, targets)):
            items = np.unique(np.asarray(items, dtype=np.int64))
            others = counts[items[items != target]]
            ranks[row] -= _tie_aware_ranks(others[None, :], counts[target])[0]
    return finalize(metric_sums(torch.from_numpy(ranks)))


def _tie_aware_ranks(scores: np.ndarray, target_scores) -> np.ndarray:
    return (scores > target_scores).sum(1) + 0.5 * (scores == target_scores).sum(1)


def sampled_metrics(
    score_fn,
    examples: list,
    num_items: int,
    batch_size: int,
    device,
    negatives: int = 999,
    seed: int = 0,
) -> dict:
    """SLMRec's protocol: rank of the target among `negatives` random items (seeded, target excluded)."""
    rng = np.random.default_rng(seed)
    totals: dict[str, float] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = prefix_batch(*zip(*chunk))
        scores = score_fn(
            batch["item_ids"].to(device), batch["lengths"].to(device)
        ).cpu()  # [B, N + 1]
        ranks = []
        for row, (_, target) in enumerate(chunk):
            pool = rng.choice(num_items - 1, size=min(negatives, num_items - 1), replace=False) + 1
            pool = pool + (pool >= target)  # skip the target: ids 1..N without it
            ranks.append(
                float(tie_aware_count(scores[row : row + 1, pool], scores[row, target][None]))
            )
        part = metric_sums(torch.tensor(ranks))
        totals = {key: totals.get(key, 0.0) + value for key, value in part.items()}
    return finalize(totals)


def inference_speed(
    score_fn, examples: list, batch_size: int, device, max_batches: int = 20
) -> dict:
    """Users/s and median latency per batch of full-catalogue scoring (after one warm-up batch)."""
    batches = [
        prefix_batch(*zip(*examples[s : s + batch_size]))
        for s in range(0, len(examples), batch_size)
    ]
    batches = [b for b in batches if len(b["lengths"]) == batch_size][: max_batches + 1] or batches[
        :2
    ]
    latencies, users = [], 0
    with torch.no_grad():
        for index, batch in enumerate(batches):
            ids, lengths = batch["item_ids"].to(device), batch["lengths"].to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            score_fn(ids, lengths)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index > 0 or len(batches) == 1:
                latencies.append(time.perf_counter() - started)
                users += len(lengths)
    return {
        "users_per_s": users / sum(latencies),
        "latency_ms_per_batch": 1000 * float(np.median(latencies)),
        "batch_size": batch_size,
        "device": str(device),
    }


def student_fns(directory: Path, device):
    """(rank_fn, score_fn) of a student release."""
    from recdistill.models.release import load_distilled

    objective = load_distilled(directory).to(device).eval()

    @torch.no_grad()
    def score_fn(ids, lengths):
        out, table = objective.encode(ids, lengths)
        return full_scores(
            out.user_reps[torch.arange(ids.shape[0], device=ids.device), lengths - 1], table
        )

    return objective.rank_targets, score_fn


def teacher_fns(directory: Path, device):
    """(rank_fn, score_fn) of a teacher release."""
    from recdistill.models.teacher import LLMRecTeacher

    teacher = LLMRecTeacher.from_pretrained(directory).to(device).eval()

    @torch.no_grad()
    def rank_fn(ids, lengths, targets, exclude=None):
        return teacher(
            ids, lengths, targets=targets, score="last", exclude=exclude
        ).stats.target_ranks

    @torch.no_grad()
    def score_fn(ids, lengths):
        return full_scores(
            teacher.last_reps(teacher(ids, lengths).user_reps, lengths), teacher.item_table()
        )

    return rank_fn, score_fn
