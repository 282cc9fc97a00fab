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

import yaml
from tqdm import tqdm

from recdistill.launcher import tuning
from recdistill.launcher.local import accelerate_command, deepspeed_command, run_job
from recdistill.trainer.config import load_config
from recdistill.trainer.defaults import DISTILL

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


# The distillation variants: overrides of configs/distill_demo.yaml (the benchmark's too).
DISTILL_VARIANTS = {
    "student_plain": [],
    # The papers' terms at their official code's settings (models/distillation.py LOSS_DEFAULTS);
    # SLMRec's multiple supervision at the code's cls_multiple_lambda when it is switched on.
    "student_dllm2rec": ["loss.ranking.enabled=true", "loss.embedding.enabled=true"],
    "student_slmrec": [
        "loss.alignment.enabled=true",
        "loss.alignment.multi_supervision_weight=1.0",
    ],
    "student_both": [
        "loss.ranking.enabled=true",
        "loss.embedding.enabled=true",
        "loss.alignment.enabled=true",
        "loss.alignment.multi_supervision_weight=1.0",
    ],
    "student_logit_kl": [
        "loss.logits.enabled=true",
        "loss.logits.temperature=1.0",
        "loss.logits.weight=2.0",
    ],
    "student_dllm2rec_kl": [
        "loss.ranking.enabled=true",
        "loss.embedding.enabled=true",
        "loss.logits.enabled=true",
        "loss.logits.temperature=1.0",
        "loss.logits.weight=2.0",
    ],
    # DLLM2Rec's own setting (its main.py): BCE with one negative plus DROS, with and without its
    # two terms; the benchmark's paper rows, not run by the demo.
    "student_paper_plain": ["loss.next_item=bce", "loss.dros.enabled=true"],
    "student_paper_dllm2rec": [
        "loss.next_item=bce",
        "loss.dros.enabled=true",
        "loss.ranking.enabled=true",
        "loss.embedding.enabled=true",
    ],
}
# The students the demo trains; the loss weights of each come from its tuning file.
DEMO_STUDENTS = [
    "student_plain",
    "student_dllm2rec",
    "student_slmrec",
    "student_both",
    "student_logit_kl",
]
# The weights chosen on the demo's validation split by `--tune` (configs/tuning/grid.yaml's grid); a
# `--tune` run writes OUT/tuning.yaml, which then wins over this copy of one such run.
DEMO_TUNING = CONFIGS / "tuning" / "demo.yaml"


def distill_run(out: Path, stage: str, run_dir: Path, overrides: list[str]) -> float | None:
    """One distillation job of the demo (2 CPU processes); None when a finished one with the same
    loss settings is there (a run with other settings, e.g. before --tune, is trained again)."""
    if (run_dir / "final/metrics.json").is_file():
        if same_losses(run_dir, overrides):
            skipped(stage, run_dir, "distill")
            return None
        say(f"{stage}: {run_dir} was trained with other loss settings; training it again")
        shutil.rmtree(run_dir)
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
    return run_stage(
        out,
        stage,
        accelerate_command("trainer/distill.py", 2, args),
        env={"ACCELERATE_USE_CPU": "true"},
    )


def same_losses(run_dir: Path, overrides: list[str]) -> bool:
    """Whether a finished run's loss section is the one these overrides make."""
    wanted = load_config(CONFIGS / "distill_demo.yaml", overrides, DISTILL)["loss"]
    return load_config(run_dir / "run_config.yaml", [], DISTILL)["loss"] == wanted


def tune_stage(out: Path, report: dict) -> None:
    """--tune: every candidate of configs/tuning/grid.yaml's grid trains once; the best validation
    NDCG@10 per student is written to OUT/tuning.yaml (test is never read)."""
    grid = tuning.load_grid()
    chosen = {}
    for name in DEMO_STUDENTS:
        variant = name.removeprefix("student_")
        candidates = tuning.candidates(grid, variant)
        valid = []
        for i, overrides in enumerate(candidates):
            run_dir = out / "tune" / f"{variant}_t{i}"
            distill_run(out, f"tune {name} {i + 1} of {len(candidates)}", run_dir, [
                *DISTILL_VARIANTS[name], *overrides
            ])  # fmt: skip
            metrics = json.loads((run_dir / "final/metrics.json").read_text())
            valid.append(metrics["best_valid_ndcg@10"])
        if candidates:
            chosen[name] = tuning.record(candidates, valid)
    (out / "tuning.yaml").write_text(yaml.safe_dump({"chosen": chosen}, sort_keys=False))
    say(f"tune: chosen on validation -> {out / 'tuning.yaml'} (the distill stage uses it)")


def chosen_choice(out: Path, name: str) -> dict | None:
    """A student's tuning record: OUT/tuning.yaml (a --tune run), else the demo's own."""
    source = out / "tuning.yaml" if (out / "tuning.yaml").is_file() else DEMO_TUNING
    return yaml.safe_load(source.read_text())["chosen"].get(name)


def chosen_overrides(out: Path, name: str) -> list[str]:
    """The tuned loss weights of a student ([] for one without a grid)."""
    choice = chosen_choice(out, name)
    return choice["candidates"][choice["chosen"]]["overrides"] if choice else []


def reuse_tuned_run(out: Path, name: str, run_dir: Path, overrides: list[str]) -> None:
    """After --tune the chosen candidate's run is the student: copied, not trained again."""
    choice = chosen_choice(out, name) if (out / "tuning.yaml").is_file() else None
    if choice is None or run_dir.exists():
        return
    tuned = out / "tune" / f"{name.removeprefix('student_')}_t{choice['chosen']}"
    if (tuned / "final/metrics.json").is_file() and same_losses(tuned, overrides):
        shutil.copytree(tuned, run_dir)


def distill_stage(out: Path, report: dict) -> None:
    figures = {}
    for name in DEMO_STUDENTS:
        run_dir = out / "student" / name.removeprefix("student_")
        overrides = [*DISTILL_VARIANTS[name], *chosen_overrides(out, name)]
        reuse_tuned_run(out, name, run_dir, overrides)
        seconds = distill_run(out, f"distill {name}", run_dir, overrides)
        if seconds is None:
            seconds = PREVIOUS.get("student_seconds", {}).get(name)
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
    parser.add_argument(
        "--tune",
        action="store_true",
        help="choose the students' loss weights on validation first (configs/tuning/grid.yaml's grid, "
        "one job per candidate, about 10 min more); without it the demo uses "
        "configs/tuning/demo.yaml, a copy of one such choice",
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
    stages = STAGES if not args.tune else [*STAGES[:3], tune_stage, *STAGES[3:]]
    grid = tuning.load_grid()
    tune_jobs = sum(len(tuning.candidates(grid, n.removeprefix("student_"))) for n in DEMO_STUDENTS)
    PROGRESS = tqdm(total=STEPS + tune_jobs * args.tune, unit="stage", desc="demo", leave=False)
    for stage in stages:
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
