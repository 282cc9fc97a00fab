"""What each change to the teacher buys: the scale's `teacher_ablation` rows, one teacher each.

    python bench/teacher_ablation.py --scale teacher_sweep_gpu --seeds 0 --jobs 12   # one GPU
    python bench/teacher_ablation.py --scale teacher_sweep_cpu --work runs/bench_cpu_sasrec  # CPU

teacher_sweep_cpu is the CPU benchmark's own teacher and scale (2 ranks of 32) with six rows at
three seeds, one teacher at a time; pointed at the cpu_sasrec work folder it reuses its data, item
features and SASRec tables.

Each row of the scale file's `teacher_ablation` list is the scale's teacher with changes: its own
`overrides` (after the scale's), with or without the item features (`features`: true for the
dataset's `item_features`, or a mapping merged into them, e.g. `{other_users: true}` for the
co-occurrence embeddings of the users the dataset's sample left out), with or without the ID
table of a plain SASRec trained first (`item_table`: E4SRec's and SLMRec's teacher input), and
with `other_users: true` trained on those left-out users' sequences too (data.extra_dirs): a
teacher that has seen more of the log than the students, none of the evaluated users' held-out
items among it.
An override of a key the benchmark sets itself (data.max_len, the seed, the paths, and
model.item_features / model.item_embeddings when `features` / `item_table` is on) is refused, not
silently replaced; other item features go in with `features` off and `model.item_features=FILE`.
Every row trains with the real job scripts through bench/quality.py's stages, under
WORK/DATASET/ablation/ROW_sSEED (finished runs are reused; an edited row is refused, as in
quality.py). The plain SASRec of the same seed (the item-table run, trained without a teacher) is
the reference: the report gives each row's validation NDCG@10 (what the scale's settings were
chosen on) and test NDCG@10, and the test lead over that SASRec.

Writes bench/results/teacher_ablation_SCALE.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the benchmark's stages: same data, same jobs)

STUDENT_REFERENCE = "item_table"  # quality.ITEM_TABLE_GROUP: the plain SASRec runs


def slug(row_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", row_name.lower()).strip("_")


def prepare_dataset(
    scale: dict, name: str, spec: dict, data_root: Path, work: Path, seeds, pool
) -> dict:
    """The dataset's prepared data, item features and, per seed, the plain SASRec whose table the
    E4SRec rows start from (the reference of the report)."""
    data_dir = quality.prepare(scale, name, spec, data_root, work)
    features = {}  # each row's item features (row_features: key -> file)
    for row in scale["teacher_ablation"]:
        source = row_features(row, spec)
        if source is not None and feature_key(source) not in features:
            features[feature_key(source)] = quality.item_features(
                scale, name, spec, data_dir, data_root, work, source
            )
    reference_scale = {**scale, "teacher_item_table": scale.get("teacher_item_table", "sasrec")}

    def table(seed: int) -> Path:
        return quality.pretrain_item_table(reference_scale, name, spec, data_dir, seed, work)

    wants_users = any(row.get("other_users") for row in scale["teacher_ablation"])
    return {
        "data": data_dir,
        "features": features,
        "tables": dict(zip(seeds, pool.map(table, seeds))),
        "other_users": quality.other_users_data(name, spec, data_root, work)
        if wants_users
        else None,
    }


def train_row(scale: dict, name: str, spec: dict, work: Path, inputs: dict, row, seed) -> dict:
    """One row's teacher at one seed: its best validation and its test metrics, or the error."""
    try:
        run_dir = quality.train_teacher(
            scale,
            name,
            spec,
            inputs["data"],
            seed,
            work,
            row_feature_file(inputs["features"], row, spec),
            inputs["tables"][seed] if row.get("item_table") else None,
            run_name=f"ablation/{slug(row['name'])}_s{seed}",
            extra_overrides=tuple(row.get("overrides", [])),
            # the users the sample left out train the teacher too
            extra_dirs=(inputs["other_users"],) if row.get("other_users") else (),
        )
    except SystemExit as failure:  # one failed row is reported, the others go on
        return {"error": str(failure).splitlines()[-1]}
    metrics = read_metrics(run_dir)
    return {"valid_ndcg@10": metrics["best_valid_ndcg@10"], "test": metrics["teacher"]}


def run_all(scale: dict, datasets: dict, data_root: Path, work: Path, seeds, jobs, report_to):
    """Every row x seed x dataset, `jobs` teachers side by side (on a GPU machine several small
    teachers share the GPU; on a 2-core CPU one at a time, each on 2 ranks), datasets interleaved;
    the report is rewritten after each run, so a cut-off sweep keeps what finished."""
    rows = scale["teacher_ablation"]
    results: dict = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        inputs = {}
        for name, spec in datasets.items():
            inputs[name] = prepare_dataset(scale, name, spec, data_root, work, seeds, pool)
            results[name] = {
                "rows": {row["name"]: {} for row in rows},
                "sasrec": {
                    seed: read_metrics(inputs[name]["tables"][seed])["student"] for seed in seeds
                },
            }
        futures = {
            pool.submit(train_row, scale, name, datasets[name], work, inputs[name], row, seed): (
                name,
                row["name"],
                seed,
            )
            for row in rows
            for seed in seeds
            for name in datasets
        }
        for future in as_completed(futures):
            name, row_name, seed = futures[future]
            outcome = future.result()
            results[name]["rows"][row_name][seed] = outcome
            said = outcome.get("error") or f"valid NDCG@10 {outcome['valid_ndcg@10']:.4f}"
            print(f"teacher_ablation: {name} / {row_name} / seed {seed}: {said}", flush=True)
            report_to(results)
    return results


def row_features(row: dict, spec: dict) -> dict | None:
    """The item feature sources of a row's teacher: none, the dataset's, or theirs with the
    row's `features` mapping merged in."""
    wanted = row.get("features")
    if not wanted:
        return None
    if not spec.get("item_features"):
        raise SystemExit(f"bench: row {row['name']!r} wants item features; the dataset has none")
    return {**spec["item_features"], **(wanted if isinstance(wanted, dict) else {})}


def feature_key(source: dict) -> str:
    return json.dumps(source, sort_keys=True)


def row_feature_file(files: dict, row: dict, spec: dict) -> Path | None:
    source = row_features(row, spec)
    return None if source is None else files[feature_key(source)]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "final/metrics.json").read_text())


def markdown(report: dict) -> str:
    lines = [
        f"# Teacher ablation, scale `{report['scale']}`",
        "",
        f"`{report['command']}`, {report['minutes']:.0f} min. Each row is the scale's teacher "
        "with the row's changes (bench/configs, `teacher_ablation`); NDCG@10, mean over seeds "
        f"{report['seeds']}; the lead is over a plain SASRec of the same seed (trained without a "
        "teacher, the table E4SRec rows start from). Test is reported, never used to choose.",
    ]
    for name, result in report["datasets"].items():
        sasrec_test = np.mean([m["ndcg@10"] for m in result["sasrec"].values()])
        lines += [
            "",
            f"## {name}",
            "",
            f"Plain SASRec: test NDCG@10 {sasrec_test:.4f}.",
            "",
            "| teacher | changes | seeds | valid NDCG@10 | test NDCG@10 | test lead over SASRec |",
            "|---|---|---|---|---|---|",
        ]
        valid_means = {}
        for row in report["rows"]:
            runs = result["rows"][row["name"]].values()
            done = [r for r in runs if "error" not in r]
            failed = [r["error"] for r in runs if "error" in r]
            if not done:
                if failed:
                    lines.append(f"| {row['name']} | {describe(row)} | failed: {failed[0]} | | | |")
                continue
            valid = valid_means[row["name"]] = np.mean([r["valid_ndcg@10"] for r in done])
            test = np.mean([r["test"]["ndcg@10"] for r in done])
            lead = 100 * (test / sasrec_test - 1)
            lines.append(
                f"| {row['name']} | {describe(row)} | {len(done)} | {valid:.4f} | {test:.4f} "
                f"| {lead:+.1f}% |"
            )
        if valid_means:
            lines += ["", f"Best on validation: {max(valid_means, key=valid_means.get)}."]
    return "\n".join(lines) + "\n"


def describe(row: dict) -> str:
    parts = [*row.get("overrides", [])]
    if row.get("features"):
        other = isinstance(row["features"], dict) and row["features"].get("other_users")
        parts.append("item features" + (" and other users' co-occurrence" if other else ""))
    if row.get("item_table"):
        parts.append("SASRec item table")
    if row.get("other_users"):
        parts.append("also trained on the users the sample left out")
    return ", ".join(f"`{p}`" if "=" in p else p for p in parts) or "the scale's teacher as is"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", default="teacher_sweep_gpu", help="a bench/configs name or file with rows"
    )
    parser.add_argument(
        "--data-root",
        default=str(quality.ROOT.parent / "shared" / "data"),
        help="folder holding ml-1m/ and beauty/ (default ../shared/data)",
    )
    parser.add_argument("--work", help="where runs are kept (default runs/bench_SCALE)")
    parser.add_argument("--datasets", nargs="*", help="subset of the scale's datasets")
    parser.add_argument("--seeds", nargs="*", type=int, help="seeds (default the scale's)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="teachers trained side by side (default 1; a GPU machine fits several small ones)",
    )
    parser.add_argument(
        "--results", default=str(quality.RESULTS), help="where the report goes (bench/results)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    scale = quality.load_scale(args.scale)
    if not scale.get("teacher_ablation"):
        raise SystemExit(f"--scale {args.scale}: no teacher_ablation rows in the scale file")
    work = Path(args.work or quality.ROOT / "runs" / f"bench_{scale['name']}").resolve()
    data_root = Path(args.data_root)
    seeds = args.seeds if args.seeds is not None else scale["seeds"]
    datasets = {
        name: spec
        for name, spec in scale["datasets"].items()
        if (not args.datasets or name in args.datasets)
        # the raw log, or its prepared data in the work folder (a machine without the raw data)
        and ((data_root / spec["path"]).is_file() or (work / name / "data/stats.json").is_file())
    }
    if not datasets:
        print("teacher_ablation: no dataset to run")
        return 0
    if args.jobs > 1:  # side-by-side jobs share the cores
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    started = time.perf_counter()
    command = "python bench/teacher_ablation.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"teacher_ablation_{scale['name']}"

    def write_report(results: dict) -> str:
        report = {
            "scale": scale["name"],
            "command": command.strip(),
            "seeds": seeds,
            "minutes": (time.perf_counter() - started) / 60,
            "rows": scale["teacher_ablation"],
            "datasets": results,
        }
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        text = markdown(report)
        stem.with_suffix(".md").write_text(text)
        return text

    results = run_all(scale, datasets, data_root, work, seeds, args.jobs, write_report)
    print(write_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
