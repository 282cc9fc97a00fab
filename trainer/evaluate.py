"""Full-ranking evaluation of students and teachers, with inference speed side by side.

    python trainer/evaluate.py --data runs/demo/data --student runs/demo/student/final \
        --teacher runs/demo/teacher/final [--split test] [--exclude-seen] [--sampled] [--device cpu]

Full ranking over all N items (padding excluded): HR@{1,5,10,20}, NDCG@{5,10,20}, MRR. With
--exclude-seen every item of the user's whole history (not only the window fed to the model) is
left out of the ranking, the protocol of Klenitskiy & Vasilev (RecSys 2023) and RecBole. With
--sampled also SLMRec's protocol: the target ranked among 999 seeded random negatives. Speed:
users/s and median latency per batch of each model on the same device and batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recdistill.models.scoring import full_scores
from recdistill.trainer.data.batches import even_shard, pad_right, prefix_batch
from recdistill.trainer.data.pipeline import load_sequences
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
    ranks = (counts[None, 1:] > counts[targets][:, None]).sum(1)
    if seen is not None:
        for row, (items, target) in enumerate(zip(seen, targets)):
            items = np.unique(np.asarray(items, dtype=np.int64))
            ranks[row] -= int((counts[items[items != target]] > counts[target]).sum())
    return finalize(metric_sums(torch.from_numpy(ranks)))


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
            ranks.append(int((scores[row, pool] > scores[row, target]).sum()))
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


# ---- models behind one interface -------------------------------------------------------------


def student_fns(directory: Path, device):
    """(rank_fn, score_fn) of a student release."""
    from recdistill.trainer.distill import load_distilled

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", required=True, help="prepared data folder (trainer/prepare_data.py output)"
    )
    parser.add_argument(
        "--student", action="append", default=[], help="student release folder (repeatable)"
    )
    parser.add_argument("--teacher", help="teacher release folder")
    parser.add_argument(
        "--split", default="test", choices=["valid", "test"], help="split to rank (default test)"
    )
    parser.add_argument(
        "--max-len", type=int, default=50, help="history length fed to the models (default 50)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="users per batch (default 256)")
    parser.add_argument(
        "--exclude-seen",
        action="store_true",
        help="rank only items outside each user's whole history (Klenitskiy & Vasilev, RecBole)",
    )
    parser.add_argument(
        "--sampled", action="store_true", help="also SLMRec's 999-negative sampled protocol"
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device for both models (default cpu)"
    )
    parser.add_argument("--output", help="write the report JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    splits, stats = load_sequences(args.data)
    examples, seen = eval_split(splits, args.split, args.max_len, args.exclude_seen)
    models = [
        (
            Path(s).name if Path(s).name != "final" else Path(s).parent.name,
            student_fns(Path(s), device),
        )
        for s in args.student
    ]
    if args.teacher:
        models.append(("teacher", teacher_fns(Path(args.teacher), device)))
    report = {
        "split": args.split,
        "users": len(examples),
        "exclude_seen": args.exclude_seen,
        "models": {},
    }
    for name, (rank_fn, score_fn) in models:
        metrics = finalize(ranking_sums(rank_fn, examples, args.batch_size, device, seen=seen))
        entry = {
            "full": metrics,
            "speed": inference_speed(score_fn, examples, args.batch_size, device),
        }
        if args.sampled:
            entry["sampled"] = sampled_metrics(
                score_fn, examples, stats["items"], args.batch_size, device
            )
        report["models"][name] = entry
    if args.teacher and len(models) > 1:
        teacher_speed = report["models"]["teacher"]["speed"]["users_per_s"]
        for entry in report["models"].values():
            entry["speedup_vs_teacher"] = entry["speed"]["users_per_s"] / teacher_speed
    print("| model | HR@10 | NDCG@10 | MRR | users/s | ms/batch | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, entry in report["models"].items():
        m, s = entry["full"], entry["speed"]
        print(
            f"| {name} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['mrr']:.4f} | {s['users_per_s']:.0f} | "
            f"{s['latency_ms_per_batch']:.2f} | {entry.get('speedup_vs_teacher', 1.0):.1f}x |"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
