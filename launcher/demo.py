"""Local runner behind `make demo`: every pipeline stage on the embedded synthetic default.

    python -m recdistill.launcher.demo --out runs/demo

Each stage runs as its own command, exactly as a user would type it (the teacher under the
`deepspeed` launcher with 2 CPU ranks), writes into its own folder under --out, and adds its key
figures to OUT/report.json and OUT/report.md. A launched stage's inputs are checked first
(`--check`: a bad input is one line, not a launcher traceback). Each stage prints one line; its
full output goes to OUT/logs/STAGE.log (the last lines are shown when it fails). A stage whose
output is already complete is not rerun (it says so, and the report keeps the seconds of the run
that made it) unless --fresh is given, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

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


LOGS = "logs"
PREVIOUS: dict = {}  # the report of an earlier run of this demo folder: seconds of skipped stages
# data, teacher, precompute, check shards, 5 students, evaluate: the demo's progress bar
STEPS = 10
PROGRESS = tqdm(total=STEPS, unit="stage", desc="demo", disable=True)


def say(line: str) -> None:
    """One line above the progress bar."""
    PROGRESS.write(line)


def log_path(out: Path, name: str) -> Path:
    return out / LOGS / (name.replace(" ", "_") + ".log")


def run_stage(out: Path, name: str, command: list[str], env: dict | None = None) -> float:
    """Run one stage's command with its output in OUT/logs; one line here, the log's tail if it
    fails."""
    log = log_path(out, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"{name}: running (log: {log.relative_to(out.parent)})")
    started = time.perf_counter()
    with open(log, "w") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        result = run_job(command, env, output=handle)
    seconds = round(time.perf_counter() - started, 1)
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        print("\n".join(f"  | {line}" for line in tail), file=sys.stderr)
        raise SystemExit(f"demo: stage {name!r} failed (exit {result.returncode}); full log: {log}")
    say(f"{name}: done in {seconds} s")
    PROGRESS.update(1)
    return seconds


def check_inputs(name: str, script: str, args: list[str], env: dict | None = None) -> None:
    """The job's own `--check`, in this process's environment: a bad input stops the demo with the
    job's one error line before any launcher starts."""
    result = run_job([sys.executable, script, "--check", *args], env, capture=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        raise SystemExit(f"demo: stage {name!r}: {lines[-1] if lines else result.stderr.strip()}")


def skipped(name: str, where: Path, stage: str) -> float | None:
    """Say that a finished stage is not rerun; its seconds from the run that made it."""
    say(f"{name}: already done in {where} (skipped; --fresh reruns every stage)")
    PROGRESS.update(2 if name == "precompute" else 1)  # precompute's skip covers its check
    return PREVIOUS.get("stages", {}).get(stage, {}).get("seconds")


def stats_seconds(data_dir: Path) -> float | None:
    return json.loads((data_dir / "stats.json").read_text()).get("seconds")


def data_stage(out: Path, report: dict) -> None:
    data_dir = out / "data"
    if (data_dir / "stats.json").is_file():
        seconds = skipped("data", data_dir, "data") or stats_seconds(data_dir)
    else:
        seconds = run_stage(
            out,
            "data",
            [sys.executable, "trainer/prepare_data.py", *DEMO_DATA_ARGS, "--output", str(data_dir)],
        )
    stats = json.loads((data_dir / "stats.json").read_text())
    report["stages"]["data"] = {
        "users": stats["users"],
        "items": stats["items"],
        "interactions": stats["interactions"],
        "median_sequence_length": stats["sequence_length"]["p50"],
        "seconds": seconds,
    }


CPU_ENV = {"DS_ACCELERATOR": "cpu"}


def teacher_stage(out: Path, report: dict) -> None:
    teacher_dir = out / "teacher"
    if (teacher_dir / "final/metrics.json").is_file():
        seconds = skipped("teacher", teacher_dir, "teacher")
    else:
        resume = ["--resume"] if (teacher_dir / "checkpoints/latest").is_file() else []
        args = [
            "--config",
            str(CONFIGS / "teacher_demo.yaml"),
            *resume,
            f"data.dir={out / 'data'}",
            f"train.output_dir={teacher_dir}",
        ]
        check_inputs("teacher", "trainer/teacher.py", args, CPU_ENV)
        seconds = run_stage(
            out, "teacher", deepspeed_command("trainer/teacher.py", 2, args), env=CPU_ENV
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
    if (shard_dir / "manifest.json").is_file():
        seconds = skipped("precompute", shard_dir, "precompute")
    else:
        args = [
            "--config",
            str(CONFIGS / "precompute_demo.yaml"),
            f"teacher={out / 'teacher/final'}",
            f"data.dir={out / 'data'}",
            f"output_dir={shard_dir}",
        ]
        check_inputs("precompute", "trainer/precompute.py", args, CPU_ENV)
        seconds = run_stage(
            out, "precompute", deepspeed_command("trainer/precompute.py", 2, args), env=CPU_ENV
        )
        run_stage(
            out,
            "check shards",
            [sys.executable, "trainer/check_shards.py", str(shard_dir), "--quiet"],
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
        stage = f"distill {name}"
        if (run_dir / "final/metrics.json").is_file():
            skipped(stage, run_dir, "distill")
            seconds = PREVIOUS.get("student_seconds", {}).get(name)
        else:
            resume = ["--resume"] if (run_dir / "checkpoints").is_dir() else []
            args = [
                "--config",
                str(CONFIGS / "distill_demo.yaml"),
                *resume,
                f"data.dir={out / 'data'}",
                f"shards.dir={out / 'shards'}",
                f"train.output_dir={run_dir}",
                *overrides,
            ]
            check_inputs(stage, "trainer/distill.py", args)
            seconds = run_stage(
                out,
                stage,
                accelerate_command("trainer/distill.py", 2, args),
                env={"ACCELERATE_USE_CPU": "true"},
            )
        metrics = json.loads((run_dir / "final/metrics.json").read_text())
        report["metrics"][name] = {k: metrics["student"][k] for k in ("hr@10", "ndcg@10", "mrr")}
        figures[name] = {"steps": metrics["steps"], "seconds": seconds}
    report["stages"]["distill"] = {f"{name} steps": f["steps"] for name, f in figures.items()}
    report["student_seconds"] = {name: f["seconds"] for name, f in figures.items()}
    known = [f["seconds"] for f in figures.values() if f["seconds"] is not None]
    report["stages"]["distill"]["seconds"] = round(sum(known), 1) if known else None


def speed_stage(out: Path, report: dict) -> None:
    """Student vs teacher inference on this machine's CPU, same batches."""
    speed_file = out / "speed.json"
    run_stage(
        out,
        "evaluate",
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


def gap_closed(metrics: dict, model: str) -> str:
    """How much of the teacher's NDCG@10 lead over the plain student a distilled one closes."""
    if not model.startswith("student_") or model == "student_plain":
        return ""
    if "teacher" not in metrics or "student_plain" not in metrics:
        return ""
    plain, teacher = metrics["student_plain"]["ndcg@10"], metrics["teacher"]["ndcg@10"]
    if teacher <= plain:
        return "teacher does not lead"
    return f"{100 * (metrics[model]['ndcg@10'] - plain) / (teacher - plain):+.0f}%"


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# recdistill demo report", ""]
    for stage, figures in report["stages"].items():
        lines.append(f"## {stage}")
        lines.extend(
            f"- {key}: {'not measured (made by an earlier version)' if value is None else value}"
            for key, value in figures.items()
        )
        lines.append("")
    if report["metrics"]:
        lines += [
            "## test metrics (full ranking)",
            "",
            "| model | HR@10 | NDCG@10 | MRR | gap closed |",
            "|---|---|---|---|---|",
        ]
        for model, values in report["metrics"].items():
            lines.append(
                f"| {model} | {values['hr@10']:.4f} | {values['ndcg@10']:.4f} | {values['mrr']:.4f} | "
                f"{gap_closed(report['metrics'], model)} |"
            )
        lines += [
            "",
            "gap closed = (student - student_plain) / (teacher - student_plain), NDCG@10 on test.",
        ]
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
    if (out / "report.json").is_file():
        PREVIOUS.update(json.loads((out / "report.json").read_text()))
    report: dict = {"stages": {}, "metrics": {}}
    global PROGRESS
    PROGRESS = tqdm(total=STEPS, unit="stage", desc="demo", leave=False)
    for stage in STAGES:
        stage(out, report)
        write_report(out, report)
    PROGRESS.close()
    table = (out / "report.md").read_text()
    print("\n" + table[table.index("## test metrics") :])
    print(f"demo: report in {out / 'report.md'}, logs in {out / LOGS}")
    return 0


STAGES = [data_stage, teacher_stage, precompute_stage, distill_stage, speed_stage]

if __name__ == "__main__":
    sys.exit(main())
