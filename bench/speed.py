"""Speed and storage, measured in one run on the runs bench/quality.py left in its work folder.

    python bench/speed.py --scale cpu                      # every dataset of runs/bench_cpu
    python bench/speed.py --scale gpu --device cuda        # on the GPU machine, after --scale gpu

Per dataset:
1. Inference: the seed-0 teacher and every plain seed-0 student score the whole catalogue for the
   test users, same batches, same device: users/s, median latency per batch, and each student's
   speed-up over the teacher (trainer/evaluate.py's inference_speed).
2. Distillation data path: every student (with DLLM2Rec + SLMRec losses, i.e. every teacher
   field in use) trains for --steps optimizer steps (a) streaming the shards through
   TeacherShardStream and the DataLoader exactly as trainer/distill.py does and (b) from the
   same batches already in memory, side by side (two identical models, 10 steps of (a), then the
   same 10 steps of (b), in turn), --repeats times, the shard files warm in the page cache.
   samples/s of each over all repeats; (a)/(b) is the data path's cost, and 1 - (a)/(b) its
   share of a training step; and (c) the same batches drawn with no model, the loader's own ms
   per batch against the in-memory step: its cost measured directly (the best of --repeats).
   Then the loader alone (bench/data_path.py):
   positions/s and MB/s per worker setting, the raw read rate of the same files, and the
   format-1 loader on the same samples.
3. Storage: shard bytes per training example against storing the full float32 logits for every
   position (positions x items x 4 bytes).
4. Teacher fine-tune throughput, read from the seed-0 teacher's metrics.jsonl (measured during
   training, evaluation and checkpoints excluded): the median over its logged windows (the first,
   warm-up step left out) of samples/s, model TFLOP/s per device and MFU (when the device's peak
   is known: a GPU in the table of trainer/throughput.py, or train.peak_tflops).
Writes bench/results/speed_SCALE.json and speed_SCALE.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from recdistill.models.distillation import DistillationObjective
from recdistill.models.release import block_dims, build_student
from recdistill.trainer.config import load_config
from recdistill.trainer.data.pipeline import load_sequences
from recdistill.trainer.data.shard_stream import (
    TeacherShardStream,
    batch_to_device,
    iter_batches,
    make_loader,
)
from recdistill.trainer.data.shards import ITEM_TABLE_FILE, load_manifest
from recdistill.trainer.defaults import DISTILL
from recdistill.trainer.evaluation import eval_split, inference_speed, student_fns, teacher_fns

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_path as loader_bench  # noqa: E402 - bench/data_path.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


def history_length(work: Path) -> int:
    """The max_len the benchmark's students were trained and evaluated with."""
    config = next((work / "students").glob("*/run_config.yaml"))
    return load_config(config)["data"]["max_len"]


def inference(work: Path, device: torch.device, batch_size: int) -> dict:
    splits, _ = load_sequences(work / "data")
    examples, _ = eval_split(splits, "test", history_length(work))
    models = {"teacher": teacher_fns(work / "teacher_s0/final", device)[1]}
    for run in sorted((work / "students").glob("*_plain_s0")):
        models[run.name.removesuffix("_plain_s0")] = student_fns(run / "final", device)[1]
    speeds = {
        name: inference_speed(score_fn, examples, batch_size, device)
        for name, score_fn in models.items()
    }
    teacher_rate = speeds["teacher"]["users_per_s"]
    for entry in speeds.values():
        entry["speedup_vs_teacher"] = entry["users_per_s"] / teacher_rate
    return speeds


def train_steps(objective, optimizer, batches, device) -> int:
    samples = 0
    for batch in batches:
        batch = batch_to_device(batch, device)
        terms = objective(batch)
        terms["total"].backward()
        optimizer.step()
        optimizer.zero_grad()
        samples += len(batch["lengths"])
    return samples


def data_path(
    work: Path,
    student: str,
    steps: int,
    workers: int | None,
    device: torch.device,
    repeats: int = 3,
    gather: str = "host",
) -> dict:
    """samples/s of the same training steps, batches streamed from shards vs held in memory.
    gather="device": batches assembled on `device` from the shards (shards.gather=device)."""
    cfg = load_config(both_config(work, student), [], DISTILL)
    workers = cfg["shards"]["workers"] if workers is None else workers
    shard_dir = work / "shards"
    manifest = load_manifest(shard_dir)
    _, stats = load_sequences(work / "data")
    batch_size = cfg["train"]["batch_size"]

    def build():
        torch.manual_seed(0)
        model = build_student(cfg["student"], stats["items"], cfg["data"]["max_len"])
        table = load_file(str(shard_dir / ITEM_TABLE_FILE))["weight"]
        objective = DistillationObjective(
            model, cfg["loss"], manifest, table, block_dims(model)
        ).to(device)
        return objective, torch.optim.AdamW(objective.parameters(), lr=cfg["train"]["lr"])

    def stream_batches():
        """steps + 1 batches as trainer/distill.py draws them (one loader across epochs)."""
        stream = TeacherShardStream(
            shard_dir, manifest, 0, 1, batch_size, workers, seed=0,
            cache_mb=cfg["shards"]["cache_mb"], gather=gather,
        )  # fmt: skip
        if stream.steps_per_epoch() == 0:
            raise SystemExit(f"{shard_dir}: fewer samples than one batch of {batch_size}")
        loader = make_loader(stream, pin_memory=device.type == "cuda")
        made = 0
        for batch in iter_batches(loader, device):
            if "skipped_shards" in batch:
                continue
            yield batch
            made += 1
            if made == steps + 1:
                return

    def side_by_side(chunk: int = 10) -> tuple[list[int], list[float]]:
        """(samples, seconds) of the two paths run side by side: two identical models take the
        same batches, `chunk` steps from the shards, then the same `chunk` steps from memory, in
        turn, so a slow or fast stretch of this shared machine falls on both."""
        models, sources = [build(), build()], [iter(stream_batches()), iter(in_memory)]
        for (objective, optimizer), source in zip(models, sources):
            train_steps(objective, optimizer, [next(source)], device)  # warm-up step
        samples, seconds = [0, 0], [0.0, 0.0]
        for done in range(0, steps, chunk):
            for side, ((objective, optimizer), source) in enumerate(zip(models, sources)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                batches = itertools.islice(source, min(chunk, steps - done))
                samples[side] += train_steps(objective, optimizer, batches, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[side] += time.perf_counter() - started
        return samples, seconds

    # Warm page cache, as from the second epoch on: the disk's read rate is the loader benchmark's
    # (bench/data_path.py, which drops the cache for it); here the data path's CPU cost is measured.
    for shard in manifest["shards"]:
        (shard_dir / shard["file"]).read_bytes()
    in_memory = list(stream_batches())  # the same batches, decoded and collated beforehand

    def loader_seconds() -> float:
        """The same batches drawn with no model: the loader's own time for `steps` batches."""
        batches = stream_batches()
        next(batches)  # as timed(): the first batch (worker start, first read) is left out
        started = time.perf_counter()
        for _ in batches:
            pass
        return time.perf_counter() - started

    # Separate runs of each path differed by +-5-10% on this shared CPU, more than the loader
    # costs; side by side, both paths see the same stretches of the machine.
    samples, seconds = [0, 0], [0.0, 0.0]
    loader = float("inf")
    for _ in range(repeats):
        run_samples, run_seconds = side_by_side()
        samples = [a + b for a, b in zip(samples, run_samples)]
        seconds = [a + b for a, b in zip(seconds, run_seconds)]
        loader = min(loader, loader_seconds())
    from_shards, from_memory = samples[0] / seconds[0], samples[1] / seconds[1]
    # The ratio of two throughputs still carries some of the machine's noise; the loader's own
    # time per batch against an in-memory step is its cost measured directly (in the training process it adds
    # to the step; with worker processes the training process only receives the batch).
    loader_ms = 1000 * loader / steps
    step_ms = 1000 * batch_size / from_memory
    return {
        "student": student,
        "losses": "next_item + DLLM2Rec ranking + collaborative embedding + SLMRec alignment",
        "steps": steps,
        "repeats": repeats,
        "batch_size": batch_size,
        "loader_workers": workers,
        "gather": gather,
        "samples_per_s_from_shards": from_shards,
        "samples_per_s_in_memory": from_memory,
        "shards_vs_in_memory": from_shards / from_memory,
        "data_path_share_of_step": 1 - from_shards / from_memory,
        "loader_ms_per_batch": loader_ms,
        "step_ms_in_memory": step_ms,
        "loader_share_of_step": loader_ms / (loader_ms + step_ms),
    }


def both_config(work: Path, student: str) -> Path:
    """The config of the student's seed-0 `both` run: the candidate bench/quality.py chose on
    validation when the scale tunes it (tuning.json), else the one run."""
    tuning = work / "tuning.json"
    chosen = json.loads(tuning.read_text()).get(f"{student}/both", {}) if tuning.is_file() else {}
    tag = f"_t{chosen['chosen']}" if chosen else ""
    return work / f"configs/{student}_both{tag}_s0.yaml"


def students_in(work: Path) -> list[str]:
    return sorted({p.name.split("_both_")[0] for p in (work / "configs").glob("*_both_*s0.yaml")})


def teacher_training(work: Path) -> dict:
    run = work / "teacher_s0"
    cfg = load_config(run / "run_config.yaml")
    windows = [
        record
        for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "tflops_per_device" in record and record["step"] > 1
    ]
    if not windows:
        raise SystemExit(f"{run}/metrics.jsonl: no throughput records (a teacher run before MFU)")
    result = {
        "steps": json.loads((run / "final/metrics.json").read_text())["steps"],
        "micro_batch_size": cfg["train"]["micro_batch_size"],
        "deepspeed_config": cfg["train"]["deepspeed_config"],
        "windows": len(windows),
    }
    for key in ("samples_per_s", "tflops_per_device", "mfu"):
        if key in windows[0]:
            result[key] = statistics.median(record[key] for record in windows)
    return result


def storage(work: Path) -> dict:
    manifest = load_manifest(work / "shards")
    full_logits = manifest["positions"] * manifest["num_items"] * 4
    return {
        "examples": manifest["examples"],
        "positions": manifest["positions"],
        "items": manifest["num_items"],
        "topk": manifest["topk"],
        "shard_bytes": manifest["bytes"],
        "bytes_per_example": manifest["bytes"] / manifest["examples"],
        "full_float32_logits_bytes_per_example": full_logits / manifest["examples"],
        "shards_vs_full_logits": manifest["bytes"] / full_logits,
    }


GATHER_NOTE = {"device": " (batches assembled on the device)"}


def loader_cell(path: dict) -> str:
    return (
        f"{path['loader_ms_per_batch']:.2f} of {path['step_ms_in_memory']:.1f} "
        f"({100 * path['loader_share_of_step']:.1f}%)"
    )


def markdown(report: dict) -> str:
    lines = [
        f"# Speed and storage, scale `{report['scale']}`",
        "",
        f"`{report['command']}` on {report['device_name']}.",
        "",
    ]
    for name, result in report["datasets"].items():
        lines += [
            f"## {name}",
            "",
            f"| model | users/s | ms per batch of {report['batch_size']} | speed-up vs teacher |",
            "|---|---|---|---|",
        ]
        for model, entry in result["inference"].items():
            lines.append(
                f"| {model} | {entry['users_per_s']:,.0f} | {entry['latency_ms_per_batch']:.1f} | "
                f"{entry['speedup_vs_teacher']:.1f}x |"
            )
        store, teacher = result["storage"], result["teacher_training"]
        mfu = f", MFU {100 * teacher['mfu']:.1f}%" if "mfu" in teacher else ""
        lines += [
            "",
            f"Teacher fine-tune ({teacher['deepspeed_config']}, micro-batch "
            f"{teacher['micro_batch_size']}, {teacher['steps']} steps): "
            f"{teacher['samples_per_s']:,.1f} samples/s, "
            f"{teacher['tflops_per_device']:.4g} model TFLOP/s per device{mfu} "
            f"(medians of {teacher['windows']} logged windows).",
            "",
            "Distillation, all losses, the same steps from shards vs from batches in memory:",
            "",
            "| student | batch | steps (runs) | loader workers | samples/s from shards | in memory | ratio | data path's share of a step | loader alone, ms per batch (vs an in-memory step) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for path in result["data_path"]:
            lines.append(
                f"| {path['student']} | {path['batch_size']} | {path['steps']} ({path.get('repeats', 1)}) | "
                f"{path['loader_workers']}{GATHER_NOTE.get(path.get('gather'), '')} | "
                f"{path['samples_per_s_from_shards']:,.0f} | "
                f"{path['samples_per_s_in_memory']:,.0f} | {path['shards_vs_in_memory']:.2f} | "
                f"{100 * path['data_path_share_of_step']:.1f}% | {loader_cell(path)} |"
            )
        lines += ["", *loader_bench.markdown(result["loader"]), ""]
        lines += [
            f"Storage: {store['bytes_per_example'] / 1e3:,.1f} kB per example (top-{store['topk']}, "
            f"hidden states) vs {store['full_float32_logits_bytes_per_example'] / 1e3:,.1f} kB of "
            f"full float32 logits: {100 * store['shards_vs_full_logits']:.1f}%.",
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", default="cpu", help="the bench/quality.py scale (default cpu)")
    parser.add_argument("--work", help="bench/quality.py's work folder (default runs/bench_SCALE)")
    parser.add_argument("--datasets", nargs="*", help="subset of the datasets in --work")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--batch-size", type=int, default=256, help="inference users per batch")
    parser.add_argument(
        "--students",
        nargs="*",
        help="students of the data-path runs (default: every one in --work)",
    )
    parser.add_argument("--steps", type=int, default=100, help="training steps per data path")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="side-by-side runs of the two paths (--steps each), summed; the loader alone: best kept",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="DataLoader workers when streaming (default: the distillation config's shards.workers)",
    )
    parser.add_argument(
        "--gather",
        choices=["host", "device"],
        default="host",
        help="where the streamed batches are assembled (shards.gather; device needs --workers 0)",
    )
    parser.add_argument(
        "--loader-workers",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="worker settings of the loader-only runs (default 0 1 2)",
    )
    parser.add_argument(
        "--loader-batch-size",
        type=int,
        default=64,
        help="batch of the loader-only runs (default 64)",
    )
    parser.add_argument(
        "--loader-epochs",
        type=int,
        default=10,
        help="epochs of the loader-only runs, and passes of the raw read (default 10)",
    )
    parser.add_argument(
        "--results",
        default=str(ROOT / "bench/results"),
        help="output folder (default bench/results)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    work = Path(args.work or ROOT / "runs" / f"bench_{args.scale}")
    names = (
        args.datasets
        or sorted(p.name for p in work.iterdir() if (p / "shards/manifest.json").is_file())
        if work.is_dir()
        else []
    )
    if not names:
        print(
            f"speed: nothing to measure in {work}: run bench/quality.py --scale {args.scale} first"
        )
        return 1
    report = {
        "scale": args.scale,
        "command": "python bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads",
        "batch_size": args.batch_size,
        "datasets": {},
    }
    for name in names:
        print(f"speed: {name}", flush=True)
        report["datasets"][name] = {
            "inference": inference(work / name, device, args.batch_size),
            "data_path": [
                data_path(
                    work / name,
                    student,
                    args.steps,
                    args.workers,
                    device,
                    args.repeats,
                    args.gather,
                )
                for student in args.students or students_in(work / name)
            ],
            "loader": loader_bench.measure(
                work / name / "shards",
                args.loader_batch_size,
                args.loader_workers,
                args.loader_epochs,
                args.device,
            ),
            "storage": storage(work / name),
            "teacher_training": teacher_training(work / name),
        }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"speed_{args.scale}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"speed_{args.scale}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
