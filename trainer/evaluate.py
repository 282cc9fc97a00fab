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
from pathlib import Path

import torch

from recdistill.trainer.data.pipeline import load_sequences
from recdistill.trainer.evaluation import (
    eval_split,
    inference_speed,
    ranking_sums,
    sampled_metrics,
    student_fns,
    teacher_fns,
)
from recdistill.trainer.metrics import finalize

# ---- models behind one interface -------------------------------------------------------------


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
