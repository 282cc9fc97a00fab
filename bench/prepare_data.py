"""Scale benchmark of the data stage: a synthetic 20M-event CSV log through prepare_data.py.

    python bench/prepare_data.py --events 20000000 --num-proc 2

Writes the log (user,item,time) to --workdir, runs `trainer/prepare_data.py --format csv` on it
in a subprocess and samples the resident memory of that process and all its workers together
every 0.1 s. Prints events/s and the peak RSS, and writes them to bench/results/prepare_data.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.csv as pacsv

from recdistill.trainer.data.synthetic import SyntheticConfig, generate_synthetic

ROOT = Path(__file__).resolve().parents[1]


def write_log(path: Path, events: int, users: int, items: int, seed: int) -> None:
    config = SyntheticConfig(users=users, items=items, events=events, seed=seed)
    writer = None
    for chunk in generate_synthetic(config):
        table = chunk.select(["user", "item", "time"])
        if writer is None:
            writer = pacsv.CSVWriter(str(path), table.schema)
        writer.write_table(table)
    writer.close()


def run_with_peak_rss(command: list[str]) -> tuple[int, float, float]:
    """Run `command`; return its exit code, wall seconds and peak RSS (bytes) of its process tree."""
    started = time.perf_counter()
    process = subprocess.Popen(command)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    return process.returncode, time.perf_counter() - started, peak


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--events", type=int, default=20_000_000, help="events in the log (default 20M)"
    )
    parser.add_argument("--users", type=int, help="users (default events/50)")
    parser.add_argument("--items", type=int, default=200_000, help="catalogue size (default 200k)")
    parser.add_argument(
        "--num-proc", type=int, default=2, help="workers of prepare_data.py (default 2)"
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument(
        "--workdir", help="where the log and output go (default: a temp folder, removed)"
    )
    parser.add_argument(
        "--results", default=str(ROOT / "bench/results/prepare_data.json"), help="JSON results file"
    )
    args = parser.parse_args()
    users = args.users or max(1, args.events // 50)

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        log = Path(work) / "log.csv"
        started = time.perf_counter()
        write_log(log, args.events, users, args.items, args.seed)
        generate_seconds = time.perf_counter() - started
        command = [
            sys.executable,
            str(ROOT / "trainer/prepare_data.py"),
            "--format",
            "csv",
            "--input",
            str(log),
            "--user-col",
            "user",
            "--item-col",
            "item",
            "--time-col",
            "time",
            "--output",
            str(Path(work) / "out"),
            "--num-proc",
            str(args.num_proc),
            # the setting its committed results were measured with (0 keeps whole histories)
            "--max-seq-len",
            "200",
        ]
        code, seconds, peak = run_with_peak_rss(command)
        if code != 0:
            print(f"prepare_data.py failed with exit code {code}", file=sys.stderr)
            return code
        stats = json.loads((Path(work) / "out/stats.json").read_text())
        result = {
            "events": args.events,
            "log_bytes": log.stat().st_size,
            "users_out": stats["users"],
            "items_out": stats["items"],
            "interactions_out": stats["interactions"],
            "num_proc": args.num_proc,
            "generate_seconds": round(generate_seconds, 1),
            "prepare_seconds": round(seconds, 1),
            "events_per_second": round(args.events / seconds),
            "peak_rss_gb": round(peak / 2**30, 2),
            "cpus": psutil.cpu_count(),
        }
    print(json.dumps(result, indent=2))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
