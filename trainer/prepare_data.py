"""Data stage: interaction log -> per-user chronological sequences (a `datasets` DatasetDict).

    python trainer/prepare_data.py --format sasrec --input ml-1m.txt --output runs/ml1m/data
    python trainer/prepare_data.py --format synthetic --users 2000 --items 500 --events 60000 \
        --output runs/demo/data

Writes OUTPUT/dataset (train: user, items; valid/test: user, history, target), OUTPUT/item_map.parquet
(item_id 1..N -> raw id; 0 is padding) and OUTPUT/stats.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from recdistill.trainer.data.formats import FORMATS, DataError, read_events
from recdistill.trainer.data.pipeline import (
    BYTES_PER_SYNTHETIC_EVENT,
    PrepareOptions,
    prepare_dataset,
)
from recdistill.trainer.data.synthetic import SyntheticConfig, generate_synthetic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--format", required=True, help=f"input format: {', '.join(FORMATS)}")
    parser.add_argument("--input", help="the log file (not used by --format synthetic)")
    parser.add_argument("--output", required=True, help="output folder (created; see --overwrite)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder"
    )
    parser.add_argument(
        "--user-col", help="user column (csv/tsv/parquet/jsonl; recbole default user_id)"
    )
    parser.add_argument(
        "--item-col", help="item column (csv/tsv/parquet/jsonl; recbole default item_id)"
    )
    parser.add_argument(
        "--time-col",
        help="time column, numeric or ISO-8601 (optional: without it the file order is the time; "
        "recbole uses `timestamp` when present)",
    )
    parser.add_argument(
        "--min-user-interactions",
        type=int,
        default=5,
        help="k-core: keep users with >= this many events (default 5)",
    )
    parser.add_argument(
        "--min-item-interactions",
        type=int,
        default=5,
        help="k-core: keep items with >= this many events (default 5)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=0,
        help="keep only the most recent items per user (default 0: whole histories; every job "
        "cuts its own data.max_len window, and evaluation can rank out everything a user has seen)",
    )
    parser.add_argument(
        "--num-proc",
        type=int,
        default=1,
        help="worker processes for k-core and grouping (default 1)",
    )
    parser.add_argument(
        "--num-parts", type=int, help="hash partitions by user (default: one per 48 MB of input)"
    )
    synthetic = parser.add_argument_group("synthetic log (--format synthetic)")
    synthetic.add_argument("--users", type=int, default=2000, help="number of users (default 2000)")
    synthetic.add_argument("--items", type=int, default=500, help="catalogue size (default 500)")
    synthetic.add_argument(
        "--events", type=int, default=60_000, help="total events (default 60000)"
    )
    synthetic.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.format not in FORMATS:
            raise DataError(f"unknown format {args.format!r}: choose one of {', '.join(FORMATS)}")
        if args.format == "synthetic":
            config = SyntheticConfig(
                users=args.users, items=args.items, events=args.events, seed=args.seed
            )
            chunks = generate_synthetic(config)
            size = args.events * BYTES_PER_SYNTHETIC_EVENT
            source = {"format": "synthetic", "synthetic": vars(config)}
        else:
            if not args.input:
                raise DataError(f"--format {args.format} needs --input")
            chunks = read_events(
                args.format, args.input, args.user_col, args.item_col, args.time_col
            )
            size = os.path.getsize(args.input)
            source = {"format": args.format, "input": str(args.input)}
        if args.max_seq_len < 0:
            raise DataError(f"--max-seq-len {args.max_seq_len}: use a positive length, or 0")
        options = PrepareOptions(
            min_user_interactions=args.min_user_interactions,
            min_item_interactions=args.min_item_interactions,
            max_seq_len=args.max_seq_len,
            num_proc=args.num_proc,
            num_parts=args.num_parts,
            source=source,
        )
        stats = prepare_dataset(chunks, size, Path(args.output), options, overwrite=args.overwrite)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = {k: stats[k] for k in ("users", "items", "interactions", "kcore_rounds", "seconds")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
