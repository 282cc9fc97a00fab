"""The README's headline table, read from the committed results files only.

    python bench/headline.py --scale cpu

Per dataset: popularity and the teacher, then one row per student with its inference speed-up
over the teacher and NDCG@10 (mean ± std over seeds) without distillation and with each
distillation variant. Reads bench/results/quality_SCALE.json and speed_SCALE.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANT_TITLES = {"plain": "plain", "dllm2rec": "DLLM2Rec", "slmrec": "SLMRec", "both": "both"}


def cell(values: dict) -> str:
    return f"{values['mean']:.4f} ± {values['std']:.4f}"


def headline(quality: dict, speed: dict) -> str:
    lines = []
    for name, result in quality["datasets"].items():
        rows = result["rows"]
        inference = speed["datasets"].get(name, {}).get("inference", {})
        variants = [v for v in VARIANT_TITLES if any(r.endswith(f"/{v}") for r in rows)]
        data = result["data"]
        lines += [
            f"**{name}** ({data['users']:,} users, {data['items']:,} items"
            + (
                f" from a {data['sampled_users']:,}-user sample"
                if data.get("sampled_users")
                else ""
            )
            + "; NDCG@10, "
            f"test, full ranking, mean ± std over seeds {quality['seeds']})",
            "",
            "| model | speed-up vs teacher | "
            + " | ".join(VARIANT_TITLES[v] for v in variants)
            + " |",
            "|---|---|" + "---|" * len(variants),
            f"| popularity | | {cell(rows['popularity']['ndcg@10'])} |"
            + " |" * (len(variants) - 1),
            f"| teacher | 1.0x | {cell(rows['teacher']['ndcg@10'])} |" + " |" * (len(variants) - 1),
        ]
        students = list(dict.fromkeys(r.split("/")[0] for r in rows if "/" in r))
        for student in students:
            speedup = inference.get(student, {}).get("speedup_vs_teacher")
            cells = [
                cell(rows[f"{student}/{v}"]["ndcg@10"]) if f"{student}/{v}" in rows else ""
                for v in variants
            ]
            speed_text = f"{speedup:.1f}x" if speedup else ""
            lines.append(f"| {student} | {speed_text} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", default="cpu", help="results of this scale (default cpu)")
    parser.add_argument(
        "--results", default=str(ROOT / "bench/results"), help="folder (default bench/results)"
    )
    args = parser.parse_args(argv)
    results = Path(args.results)
    quality_file = results / f"quality_{args.scale}.json"
    if not quality_file.is_file():
        raise SystemExit(f"{quality_file}: not found; run bench/quality.py --scale {args.scale}")
    speed_file = results / f"speed_{args.scale}.json"
    speed = json.loads(speed_file.read_text()) if speed_file.is_file() else {"datasets": {}}
    print(headline(json.loads(quality_file.read_text()), speed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
