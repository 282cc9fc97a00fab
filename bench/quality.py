"""Quality on real data: popularity, the teacher, and four students with and without distillation.

    python bench/quality.py --scale cpu      # reduced scale, 2-core CPU, about an hour
    python bench/quality.py --scale gpu      # full scale on a GPU machine, same pipeline
    python bench/quality.py --scale cpu --datasets ml-1m --students sasrec --variants plain --seeds 0

For every dataset of the scale file (bench/configs/SCALE.yaml) found under --data-root:
1. prepare it with trainer/prepare_data.py (after a seeded sample of its users when the scale
   asks for one);
2. fine-tune the teacher once per seed with trainer/teacher.py under the deepspeed launcher;
3. precompute the seed-0 teacher's shards with trainer/precompute.py;
4. train every student x variant x seed with trainer/distill.py (variants: plain = next-item
   cross-entropy only, dllm2rec, slmrec, both; the same overrides as the demo's), the scale's
   `student_jobs` of them side by side (cpu: 2, one torch thread each).
Every job is the real job script run as its own process, with its config written into its run
folder under --work; a finished run is reused, so an interrupted benchmark continues where it
stopped. A job whose config differs from the one an earlier invocation wrote there (an edited
scale file) is refused with the keys that changed, never reused or resumed. Test metrics are leave-one-out, full ranking over the whole catalogue; a scale with
`exclude_seen: true` prepares whole histories and ranks each user's history out (validation, test
and popularity), the protocol of the published numbers it lists under `published:`.

Writes bench/results/quality_SCALE.json (every seed's numbers, means and spreads),
quality_SCALE.md (the tables) and curves_SCALE_DATASET.png (validation NDCG@10 against training
examples seen, teacher vs students).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from recdistill.launcher.demo import DISTILL_VARIANTS
from recdistill.launcher.local import accelerate_command, deepspeed_command
from recdistill.launcher.local import run_job as run_process
from recdistill.trainer.config import load_config, save_config
from recdistill.trainer.defaults import DISTILL, PRECOMPUTE, TEACHER

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
METRICS = ("hr@10", "ndcg@10", "mrr")
JOB_SECONDS: dict[str, float] = {}  # log name -> wall seconds of the jobs this invocation ran
SECONDS_LOCK = threading.Lock()  # student jobs run side by side and share seconds.json


# ---- configuration -------------------------------------------------------------------------


def load_scale(name_or_path: str, extended_by: tuple[Path, ...] = ()) -> dict:
    """The scale file bench/configs/NAME.yaml (or a path). A file with `extends: BASE` is BASE
    with this file's keys merged in: see merge_scale."""
    path = Path(name_or_path)
    if not path.is_file():
        path = ROOT / "bench" / "configs" / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in (ROOT / "bench" / "configs").glob("*.yaml")))
        raise SystemExit(f"--scale {name_or_path}: no such file (bench/configs/ has {names})")
    path = path.resolve()
    if path in extended_by:
        chain = " -> ".join(str(p) for p in (*extended_by, path))
        raise SystemExit(f"{path}: extends itself ({chain})")
    scale = yaml.safe_load(path.read_text())
    base = scale.pop("extends", None)
    if base is not None:
        scale = merge_scale(load_scale(base, (*extended_by, path)), scale)
    scale["name"] = path.stem
    return scale


def merge_scale(base: dict, changes: dict) -> dict:
    """base with `changes` merged in: mappings merge key by key, an `overrides` list is appended
    to the base's (later overrides win, so a shorter schedule is one line), a key set to null is
    dropped (a dataset left out), anything else replaces the base's value."""
    merged = dict(base)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_scale(merged[key], value)
        elif key == "overrides" and isinstance(value, list):
            merged[key] = [*merged.get(key, []), *value]
        else:
            merged[key] = value
    return merged


def excludes_seen(scale: dict) -> bool:
    """The scale's protocol: rank out each user's whole history (validation, test, popularity)."""
    return bool(scale.get("exclude_seen", False))


def write_job_config(
    base: str, overrides: list[str], defaults: dict, settings: dict, path: Path
) -> Path:
    """The job's config: its base file, the scale's overrides, then this run's settings."""
    config = load_config(ROOT / base, overrides, defaults)
    for dotted, value in settings.items():
        section = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            section = section[part]
        section[leaf] = value
    return keep_job_config(config, path)


def keep_job_config(config: dict, path: Path) -> Path:
    """Write a job's config, or check it against the one an earlier invocation wrote there: a
    finished run is reused and a started one resumed, so a changed scale file must not meet them."""
    if path.is_file():
        changed = differences(yaml.safe_load(path.read_text()), config)
        if changed:
            raise SystemExit(
                f"bench: {path} was written by an earlier invocation with other settings "
                f"({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}); its run would "
                f"be reused or resumed with them. Pass --work NEW_FOLDER, or delete "
                f"{path.parent.parent} to rerun this dataset."
            )
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(config, path)
    return path


def differences(earlier, now, key: str = "") -> list[str]:
    """'key: earlier -> now' for every leaf of both that differs (dotted keys). A key only one
    side has is an option a newer or older recdistill added or dropped, not a changed setting."""
    if isinstance(earlier, dict) and isinstance(now, dict):
        return [
            change
            for name in earlier
            if name in now
            for change in differences(
                earlier[name], now[name], f"{key}.{name}" if key else str(name)
            )
        ]
    # Through JSON so a tuple and the list YAML reads back compare equal.
    if json.loads(json.dumps(earlier)) == json.loads(json.dumps(now)):
        return []
    return [f"{key or 'config'}: {earlier!r} -> {now!r}"]


# ---- running jobs --------------------------------------------------------------------------


def run_job(command: list[str], log_path: Path, env: dict, timeout: float | None = None) -> float:
    """Run one job with its output in log_path; a failure or a job still running after
    `timeout` seconds (all its ranks are then ended) names the log and shows its end."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        try:
            code = run_process(command, env, timeout=timeout, output=log).returncode
            failure = f"exit {code}" if code != 0 else None
        except subprocess.TimeoutExpired:
            failure = f"still running after job_timeout_s={timeout:g} s; ended"
    if failure:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{tail}\nbench: job failed ({failure}); log: {log_path}")
    seconds = time.perf_counter() - started
    JOB_SECONDS[log_path.stem] = round(seconds, 1)
    record_seconds(log_path.parent / "seconds.json", log_path.stem, seconds)
    return seconds


def record_seconds(record: Path, key: str, seconds: float, add: bool = False) -> None:
    """Kept beside the logs across invocations, so a resumed benchmark still reports its total
    (`add`: this invocation's seconds are added to the earlier ones')."""
    with SECONDS_LOCK:
        times = json.loads(record.read_text()) if record.is_file() else {}
        times[key] = round(seconds + (times.get(key, 0.0) if add else 0.0), 1)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(times, indent=1) + "\n")


def deepspeed_job(scale: dict, script: str, config: Path, extra: list[str] | None = None):
    command = deepspeed_command(script, scale["ranks"], ["--config", str(config), *(extra or [])])
    return command, ({"DS_ACCELERATOR": "cpu"} if scale["device"] == "cpu" else {})


def distill_job(scale: dict, config: Path, resume: bool):
    args = ["--config", str(config), *(["--resume"] if resume else [])]
    env = {"ACCELERATE_USE_CPU": "true"} if scale["device"] == "cpu" else {}
    if scale["student_processes"] == 1:  # Accelerate in a plain process: no launcher start-up
        return [sys.executable, "trainer/distill.py", *args], env
    return accelerate_command("trainer/distill.py", scale["student_processes"], args), env


# ---- the stages ----------------------------------------------------------------------------


def sample_users(source: Path, count: int, seed: int, target: Path) -> None:
    """Keep the lines of `count` users drawn with `seed` (the user is each line's first field:
    true of the sasrec and lines formats)."""
    lines = source.read_text().splitlines(keepends=True)
    users = list(dict.fromkeys(line.split(maxsplit=1)[0] for line in lines if line.strip()))
    if count >= len(users):
        raise SystemExit(f"{source}: sample_users {count} >= the {len(users)} users there")
    chosen = set(np.random.default_rng(seed).choice(users, size=count, replace=False).tolist())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        "".join(line for line in lines if line.strip() and line.split(maxsplit=1)[0] in chosen)
    )


def prepare(scale: dict, name: str, spec: dict, data_root: Path, work: Path) -> Path:
    data_dir = work / name / "data"
    # Whole histories when they are ranked out; else what the jobs read: the training sequence
    # keeps max_len + 1 after the split.
    max_seq_len = 0 if excludes_seen(scale) else spec["max_len"] + 3
    settings = {key: spec.get(key) for key in ("path", "format", "sample_users")}
    keep_job_config({**settings, "max_seq_len": max_seq_len}, work / name / "configs/prepare.yaml")
    if (data_dir / "stats.json").is_file():
        return data_dir
    source = data_root / spec["path"]
    if spec.get("sample_users"):
        sampled = work / name / f"sample_{spec['sample_users']}_users.txt"
        sample_users(source, spec["sample_users"], 0, sampled)
        source = sampled
    command = [
        sys.executable,
        "trainer/prepare_data.py",
        "--format",
        spec["format"],
        "--input",
        str(source),
        "--output",
        str(data_dir),
        "--max-seq-len",
        str(max_seq_len),
    ]
    run_job(command, work / name / "logs/prepare.log", {})
    return data_dir


def train_teacher(
    scale: dict, name: str, spec: dict, data_dir: Path, seed: int, work: Path
) -> Path:
    run_dir = work / name / f"teacher_s{seed}"
    config = write_job_config(
        scale["teacher"]["config"],
        [*scale["teacher"]["overrides"], *spec.get("teacher_overrides", [])],
        TEACHER,
        {
            "data.dir": str(data_dir),
            "data.max_len": spec["max_len"],
            "train.output_dir": str(run_dir),
            "train.seed": seed,
            "train.eval_exclude_history": excludes_seen(scale),
        },
        work / name / f"configs/teacher_s{seed}.yaml",
    )
    if (run_dir / "final/metrics.json").is_file():
        return run_dir
    resume = ["--resume"] if (run_dir / "checkpoints/latest").is_file() else []
    command, env = deepspeed_job(scale, "trainer/teacher.py", config, resume)
    run_job(command, work / name / f"logs/teacher_s{seed}.log", env, scale.get("job_timeout_s"))
    return run_dir


def precompute_shards(
    scale: dict, name: str, spec: dict, data_dir: Path, teacher_dir: Path, work: Path
) -> Path:
    shard_dir = work / name / "shards"
    config = write_job_config(
        scale["precompute"]["config"],
        scale["precompute"]["overrides"],
        PRECOMPUTE,
        {
            "teacher": str(teacher_dir / "final"),
            "data.dir": str(data_dir),
            "data.max_len": spec["max_len"],
            "output_dir": str(shard_dir),
        },
        work / name / "configs/precompute.yaml",
    )
    if (shard_dir / "manifest.json").is_file():
        return shard_dir
    command, env = deepspeed_job(scale, "trainer/precompute.py", config)  # resumes by itself
    run_job(command, work / name / "logs/precompute.log", env, scale.get("job_timeout_s"))
    return shard_dir


def train_student(
    scale: dict,
    name: str,
    spec: dict,
    paths: dict,
    student: str,
    variant: str,
    seed: int,
    work: Path,
) -> Path:
    run_name = f"{student}_{variant}_s{seed}"
    run_dir = work / name / "students" / run_name
    student_section = scale["students"][student]
    settings = {
        "data.dir": str(paths["data"]),
        "data.max_len": spec["max_len"],
        "shards.dir": str(paths["shards"]),
        "student.architecture": student_section["architecture"],
        "student.options": student_section["options"],
        "train.output_dir": str(run_dir),
        "train.seed": seed,
        "train.eval_exclude_history": excludes_seen(scale),
    }
    if scale["device"] == "cpu" and student_jobs(scale) > 1:  # side by side jobs share the cores
        settings["train.cpu_threads"] = max(
            1, (os.cpu_count() or 1) // (student_jobs(scale) * scale["student_processes"])
        )
    config = write_job_config(
        scale["distill"]["config"],
        [
            *scale["distill"]["overrides"],
            *spec.get("distill_overrides", []),
            *DISTILL_VARIANTS[f"student_{variant}"],
            *student_section.get("overrides", []),
        ],
        DISTILL,
        settings,
        work / name / f"configs/{run_name}.yaml",
    )
    if (run_dir / "final/metrics.json").is_file():
        return run_dir
    command, env = distill_job(scale, config, resume=(run_dir / "checkpoints").is_dir())
    run_job(command, work / name / f"logs/{run_name}.log", env, scale.get("job_timeout_s"))
    return run_dir


def student_jobs(scale: dict) -> int:
    return int(scale.get("student_jobs", 1))


def train_students(
    scale: dict, name: str, spec: dict, paths: dict, runs: list, work: Path, progress: tqdm
) -> None:
    """Every (student, variant, seed) of one dataset, `student_jobs` of them at a time: the jobs
    are independent, and on a 2-core CPU two one-thread jobs finish sooner than one after another
    with two threads each (small models leave the second core idle much of the time)."""
    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=student_jobs(scale))
    futures = {
        pool.submit(train_student, scale, name, spec, paths, *run, work): run for run in runs
    }
    try:
        for future in as_completed(futures):
            future.result()  # a failed job ends the benchmark: queued jobs are dropped
            progress.set_postfix_str(f"{name} student " + " ".join(map(str, futures[future])))
            progress.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # running jobs finish and are kept
        record_seconds(
            work / name / "logs/seconds.json", "students_wall", time.perf_counter() - started, True
        )


# ---- results -------------------------------------------------------------------------------


def summarize(values: list[float]) -> dict:
    array = np.asarray(values, dtype=float)
    spread = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": spread, "values": [float(v) for v in array]}


def validation_curve(run_dir: Path, examples_per_step: int) -> list[tuple[int, float]]:
    """(training examples seen, validation NDCG@10) from a job's metrics.jsonl, or from its
    TensorBoard events for students trained before distill.py wrote validation there too."""
    by_step = {}  # a resumed job re-runs the steps after its checkpoint: the last record wins
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "valid/ndcg@10" in record:
            by_step[record["step"]] = record["valid/ndcg@10"]
    steps = sorted(by_step.items())
    if not steps and (run_dir / "tensorboard").is_dir():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        if "valid/ndcg@10" in events.Tags()["scalars"]:
            steps = [(e.step, e.value) for e in events.Scalars("valid/ndcg@10")]
    return [(step * examples_per_step, value) for step, value in steps]


def examples_per_step(run_dir: Path, kind: str, ranks: int) -> int:
    config = yaml.safe_load((run_dir / "run_config.yaml").read_text())["train"]
    if kind == "teacher":
        return config["micro_batch_size"] * config["grad_accum"] * ranks
    return config["batch_size"] * config["grad_accum"] * ranks


def collect(
    scale: dict, name: str, work: Path, students: list, variants: list, seeds: list
) -> dict:
    base = work / name
    stats = json.loads((base / "data/stats.json").read_text())
    teacher_runs = [base / f"teacher_s{seed}" for seed in seeds]
    teacher_metrics = [json.loads((r / "final/metrics.json").read_text()) for r in teacher_runs]
    rows = {
        "popularity": {m: summarize([teacher_metrics[0]["popularity"][m]]) for m in METRICS},
        "teacher": {m: summarize([t["teacher"][m] for t in teacher_metrics]) for m in METRICS},
    }
    curves = {
        "teacher": validation_curve(
            teacher_runs[0], examples_per_step(teacher_runs[0], "teacher", scale["ranks"])
        )
    }
    for student in students:
        for variant in variants:
            runs = [base / "students" / f"{student}_{variant}_s{seed}" for seed in seeds]
            results = [json.loads((r / "final/metrics.json").read_text()) for r in runs]
            rows[f"{student}/{variant}"] = {
                m: summarize([r["student"][m] for r in results]) for m in METRICS
            }
            curves[f"{student}/{variant}"] = validation_curve(
                runs[0], examples_per_step(runs[0], "student", scale["student_processes"])
            )
    record = base / "logs/seconds.json"
    times = json.loads(record.read_text()) if record.is_file() else {}
    stage_minutes = {
        stage: round(sum(v for k, v in times.items() if k.startswith(prefix)) / 60, 1)
        for stage, prefix in (("teacher", "teacher_"), ("precompute", "precompute"))
    }
    # Wall time of the student stage: its jobs may run side by side (`student_jobs`).
    student_seconds = times.get("students_wall") or sum(
        v for k, v in times.items() if not k.startswith(("teacher_", "precompute", "prepare"))
    )
    stage_minutes["students"] = round(student_seconds / 60, 1)
    return {
        "data": {
            **{k: stats[k] for k in ("users", "items", "interactions")},
            "sampled_users": scale["datasets"][name].get("sample_users"),
            "max_len": scale["datasets"][name]["max_len"],
        },
        "job_minutes": stage_minutes,
        "rows": rows,
        "curves": curves,
    }


def markdown(report: dict) -> str:
    lines = [
        f"# Quality benchmark, scale `{report['scale']}`",
        "",
        f"`{report['command']}` — {report['device']}, {report['minutes']:.0f} min for this "
        "invocation (a resumed benchmark reuses finished runs). "
        "Leave-one-out test split, full ranking over "
        + (
            "the items each user has not interacted with (history ranked out)"
            if report.get("exclude_seen")
            else "all items"
        )
        + f"; mean ± std over seeds {report['seeds']}.",
        "",
    ]
    for name, result in report["datasets"].items():
        data = result["data"]
        lines += [
            f"## {name}: {data['users']:,} users, {data['items']:,} items, "
            f"{data['interactions']:,} interactions"
            + (
                f" (a seeded sample of {data['sampled_users']:,} users, then 5-core)"
                if data.get("sampled_users")
                else ""
            )
            + (f", histories of up to {data['max_len']} items" if data.get("max_len") else ""),
            "",
            *(
                [
                    "Job time: "
                    + ", ".join(f"{k} {v} min" for k, v in result["job_minutes"].items())
                    + ".",
                    "",
                ]
                if "job_minutes" in result
                else []
            ),
            "| model | HR@10 | NDCG@10 | MRR | NDCG@10 vs plain |",
            "|---|---|---|---|---|",
        ]
        for row, values in result["rows"].items():
            student, _, variant = row.partition("/")
            plain = result["rows"].get(f"{student}/plain")
            change = (
                f"{100 * (values['ndcg@10']['mean'] / plain['ndcg@10']['mean'] - 1):+.1f}%"
                if plain and variant != "plain"
                else ""
            )
            cells = " | ".join(f"{values[m]['mean']:.4f} ± {values[m]['std']:.4f}" for m in METRICS)
            lines.append(f"| {row} | {cells} | {change} |")
        published = report.get("published", {}).get(name)
        if published:
            row = result["rows"][published["row"]]
            lines += [
                "",
                f"Published {published['row']} ({published['source']}): "
                + ", ".join(
                    f"{m.upper()} {published[m]:.4f} (here {row[m]['mean']:.4f}, "
                    f"{100 * (row[m]['mean'] / published[m] - 1):+.1f}%)"
                    for m in METRICS
                    if m in published
                )
                + ".",
            ]
        lines.append("")
    return "\n".join(lines)


def plot_curves(report: dict, scale_name: str, results: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    written = []
    for name, result in report["datasets"].items():
        students = sorted({row.split("/")[0] for row in result["curves"] if "/" in row})
        figure, axes = plt.subplots(
            1, len(students), figsize=(4.2 * len(students), 3.6), squeeze=False
        )
        for axis, student in zip(axes[0], students, strict=True):
            teacher_points = result["curves"]["teacher"]
            axis.plot(*zip(*teacher_points), color="black", linestyle="--", label="teacher")
            for row, points in result["curves"].items():
                if row.startswith(f"{student}/") and points:
                    axis.plot(*zip(*points), marker=".", label=row.split("/")[1])
            axis.set_title(f"{name}: {student}")
            axis.set_xlabel("training examples seen")
            axis.xaxis.set_major_formatter(  # 35000 -> 35k: long tick labels ran together
                FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x else "0")
            )
            axis.set_ylabel("validation NDCG@10")
            axis.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        figure.tight_layout()
        path = results / f"curves_{scale_name}_{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


# ---- the benchmark -------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", default="cpu", help="cpu | gpu | a scale YAML file (default cpu)"
    )
    parser.add_argument(
        "--data-root",
        default=str(ROOT.parent / "shared" / "data"),
        help="folder holding ml-1m/ and beauty/ (default ../shared/data)",
    )
    parser.add_argument(
        "--work", help="where runs are kept (default runs/bench_SCALE); reused to resume"
    )
    parser.add_argument("--datasets", nargs="*", help="subset of the scale's datasets")
    parser.add_argument("--students", nargs="*", help="subset of sasrec gru4rec caser llama")
    parser.add_argument("--variants", nargs="*", help="subset of plain dllm2rec slmrec both")
    parser.add_argument("--seeds", nargs="*", type=int, help="seeds (default the scale's)")
    parser.add_argument(
        "--results",
        default=str(RESULTS),
        help="where quality_SCALE.{json,md} and the plots go (default bench/results)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    scale = load_scale(args.scale)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or ROOT / "runs" / f"bench_{scale['name']}").resolve()
    data_root = Path(args.data_root)
    seeds = args.seeds if args.seeds is not None else scale["seeds"]
    students = args.students or list(scale["students"])
    variants = args.variants or scale["variants"]
    datasets = {
        name: spec
        for name, spec in scale["datasets"].items()
        if (not args.datasets or name in args.datasets)
    }
    missing = [name for name, spec in datasets.items() if not (data_root / spec["path"]).is_file()]
    for name in missing:
        print(f"bench: skipping {name}: {data_root / datasets[name]['path']} is not there")
        del datasets[name]
    if not datasets:
        print("bench: no dataset to run")
        return 0

    started = time.perf_counter()
    student_runs = [(s, v, seed) for s in students for v in variants for seed in seeds]
    total_jobs = len(datasets) * (2 + len(seeds) + len(student_runs))
    with tqdm(total=total_jobs, desc="bench", unit="job") as progress:
        for name, spec in datasets.items():
            progress.set_postfix_str(f"{name} prepare")
            data_dir = prepare(scale, name, spec, data_root, work)
            progress.update()
            teacher_runs = []
            for seed in seeds:
                progress.set_postfix_str(f"{name} teacher {seed}")
                teacher_runs.append(train_teacher(scale, name, spec, data_dir, seed, work))
                progress.update()
            progress.set_postfix_str(f"{name} precompute")
            # the first seed's teacher is the one distilled
            shards = precompute_shards(scale, name, spec, data_dir, teacher_runs[0], work)
            progress.update()
            paths = {"data": data_dir, "shards": shards}
            train_students(scale, name, spec, paths, student_runs, work, progress)

    command = "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "scale": scale["name"],
        "command": command.strip(),
        "device": scale["device"],
        "seeds": seeds,
        "exclude_seen": excludes_seen(scale),
        "published": scale.get("published", {}),
        "minutes": (time.perf_counter() - started) / 60,
        "datasets": {
            name: collect(scale, name, work, students, variants, seeds) for name in datasets
        },
    }
    stem = results / f"quality_{scale['name']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plots = plot_curves(report, scale["name"], results)
    print(markdown(report))
    print(f"bench: wrote {stem}.json, {stem}.md, " + ", ".join(str(p) for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
