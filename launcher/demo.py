"""Local runner behind `make demo`: every pipeline stage on the embedded synthetic default.

    python -m recdistill.launcher.demo --out runs/demo

Each stage runs as its own command, exactly as a user would type it (the teacher under the
`deepspeed` launcher with 2 CPU ranks), writes into its own folder under --out, and adds its key
figures to OUT/report.json and OUT/report.md. A stage whose output is already complete is not
rerun unless --fresh is given, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from recdistill.launcher.local import accelerate_command, deepspeed_command, run_job

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# The embedded default: the synthetic log of the demo (and of the tests).
DEMO_DATA_ARGS = [
    "--format",
    "synthetic",
    "--users",
    "2000",
    "--items",
    "500",
    "--events",
    "60000",
    "--seed",
    "0",
    "--max-seq-len",
    "50",
]


def run_stage(name: str, command: list[str], env: dict | None = None) -> float:
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    result = run_job(command, env)
    if result.returncode != 0:
        raise SystemExit(f"demo: stage {name!r} failed with exit code {result.returncode}")
    return round(time.perf_counter() - started, 1)


def data_stage(out: Path, report: dict) -> None:
    data_dir = out / "data"
    seconds = None
    if not (data_dir / "stats.json").is_file():
        seconds = run_stage(
            "data",
            [sys.executable, "trainer/prepare_data.py", *DEMO_DATA_ARGS, "--output", str(data_dir)],
        )
    stats = json.loads((data_dir / "stats.json").read_text())
    report["stages"]["data"] = {
        "users": stats["users"],
        "items": stats["items"],
        "interactions": stats["interactions"],
        "median_sequence_length": stats["sequence_length"]["p50"],
        "seconds": seconds if seconds is not None else stats["seconds"],
    }


CPU_ENV = {"DS_ACCELERATOR": "cpu"}


def teacher_stage(out: Path, report: dict) -> None:
    teacher_dir = out / "teacher"
    seconds = None
    if not (teacher_dir / "final/metrics.json").is_file():
        resume = ["--resume"] if (teacher_dir / "checkpoints/latest").is_file() else []
        seconds = run_stage(
            "teacher",
            deepspeed_command(
                "trainer/teacher.py",
                2,
                [
                    "--config",
                    str(CONFIGS / "teacher_demo.yaml"),
                    *resume,
                    f"data.dir={out / 'data'}",
                    f"train.output_dir={teacher_dir}",
                ],
            ),
            env=CPU_ENV,
        )
    metrics = json.loads((teacher_dir / "final/metrics.json").read_text())
    report["stages"]["teacher"] = {
        "steps": metrics["steps"],
        "best_valid_ndcg@10": round(metrics["best_valid_ndcg@10"], 4),
        "ranks": 2,
        "zero_stage": 3,
        "seconds": seconds,
    }
    for name in ("popularity", "teacher"):
        report["metrics"][name] = {k: metrics[name][k] for k in ("hr@10", "ndcg@10", "mrr")}


def precompute_stage(out: Path, report: dict) -> None:
    shard_dir = out / "shards"
    seconds = None
    if not (shard_dir / "manifest.json").is_file():
        seconds = run_stage(
            "precompute",
            deepspeed_command(
                "trainer/precompute.py",
                2,
                [
                    "--config",
                    str(CONFIGS / "precompute_demo.yaml"),
                    f"teacher={out / 'teacher/final'}",
                    f"data.dir={out / 'data'}",
                    f"output_dir={shard_dir}",
                ],
            ),
            env=CPU_ENV,
        )
        run_stage(
            "check shards", [sys.executable, "trainer/check_shards.py", str(shard_dir), "--quiet"]
        )
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    full_logits = manifest["positions"] * manifest["num_items"] * 4
    report["stages"]["precompute"] = {
        "examples": manifest["examples"],
        "positions": manifest["positions"],
        "shards": len(manifest["shards"]),
        "topk": manifest["topk"],
        "megabytes": round(manifest["bytes"] / 1e6, 2),
        "bytes_vs_full_float32_logits": round(manifest["bytes"] / full_logits, 4),
        "seconds": seconds,
    }


# The demo's distillation variants: overrides of configs/distill_demo.yaml. The collaborative
# embedding weight is 0.1 here, not DLLM2Rec's 0.3: 0.3 made the demo student worse (README).
DISTILL_VARIANTS = {
    "student_plain": [],
    "student_dllm2rec": [
        "loss.ranking.enabled=true",
        "loss.embedding.enabled=true",
        "loss.embedding.weight=0.1",
    ],
    "student_slmrec": [
        "loss.alignment.enabled=true",
        "loss.alignment.multi_supervision_weight=0.1",
    ],
    "student_both": [
        "loss.ranking.enabled=true",
        "loss.embedding.enabled=true",
        "loss.embedding.weight=0.1",
        "loss.alignment.enabled=true",
        "loss.alignment.multi_supervision_weight=0.1",
    ],
    "student_logit_kl": [
        "loss.logits.enabled=true",
        "loss.logits.temperature=1.0",
        "loss.logits.weight=2.0",
    ],
}


def distill_stage(out: Path, report: dict) -> None:
    figures = {}
    for name, overrides in DISTILL_VARIANTS.items():
        run_dir = out / "student" / name.removeprefix("student_")
        seconds = None
        if not (run_dir / "final/metrics.json").is_file():
            resume = ["--resume"] if (run_dir / "checkpoints").is_dir() else []
            seconds = run_stage(
                f"distill {name}",
                accelerate_command(
                    "trainer/distill.py",
                    2,
                    [
                        "--config",
                        str(CONFIGS / "distill_demo.yaml"),
                        *resume,
                        f"data.dir={out / 'data'}",
                        f"shards.dir={out / 'shards'}",
                        f"train.output_dir={run_dir}",
                        *overrides,
                    ],
                ),
                env={"ACCELERATE_USE_CPU": "true"},
            )
        metrics = json.loads((run_dir / "final/metrics.json").read_text())
        report["metrics"][name] = {k: metrics["student"][k] for k in ("hr@10", "ndcg@10", "mrr")}
        figures[name] = {"steps": metrics["steps"], "seconds": seconds}
    report["stages"]["distill"] = {f"{name} steps": f["steps"] for name, f in figures.items()}
    report["stages"]["distill"]["seconds"] = (
        sum(f["seconds"] or 0 for f in figures.values()) or None
    )


def speed_stage(out: Path, report: dict) -> None:
    """Student vs teacher inference on this machine's CPU, same batches."""
    speed_file = out / "speed.json"
    run_stage(
        "evaluate (quality and speed)",
        [
            sys.executable,
            "trainer/evaluate.py",
            "--data",
            str(out / "data"),
            "--student",
            str(out / "student/plain/final"),
            "--student",
            str(out / "student/dllm2rec/final"),
            "--teacher",
            str(out / "teacher/final"),
            "--output",
            str(speed_file),
        ],
    )
    models = json.loads(speed_file.read_text())["models"]
    report["stages"]["speed"] = {
        f"{name} users/s": round(entry["speed"]["users_per_s"]) for name, entry in models.items()
    } | {"dllm2rec student speed-up vs teacher": round(models["dllm2rec"]["speedup_vs_teacher"], 2)}


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# recdistill demo report", ""]
    for stage, figures in report["stages"].items():
        lines.append(f"## {stage}")
        lines.extend(f"- {key}: {value}" for key, value in figures.items())
        lines.append("")
    if report["metrics"]:
        lines += [
            "## test metrics (full ranking)",
            "",
            "| model | HR@10 | NDCG@10 | MRR |",
            "|---|---|---|---|",
        ]
        for model, values in report["metrics"].items():
            lines.append(
                f"| {model} | {values['hr@10']:.4f} | {values['ndcg@10']:.4f} | {values['mrr']:.4f} |"
            )
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--fresh", action="store_true", help="delete --out first and rerun every stage"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"stages": {}, "metrics": {}}
    for stage in STAGES:
        stage(out, report)
        write_report(out, report)
    print(f"\n{(out / 'report.md').read_text()}")
    print(f"demo: everything is under {out}")
    return 0


STAGES = [data_stage, teacher_stage, precompute_stage, distill_stage, speed_stage]

if __name__ == "__main__":
    sys.exit(main())
