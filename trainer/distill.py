"""Distil a student from precomputed teacher shards with Accelerate; the teacher is never loaded.

    accelerate launch trainer/distill.py --config configs/distill_demo.yaml [key=value ...]
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 trainer/distill.py \
        --config configs/distill_demo.yaml

Recipe: parse config -> check the shards against the data (item vocabulary) -> build the student
and the distillation objective (DLLM2Rec ranking + collaborative embeddings, SLMRec alignment +
multiple supervision, top-K logit KL; each term switchable) -> stream the shards (split by rank
and worker, not through accelerator.prepare) -> train with periodic full-ranking validation,
early stopping, Accelerate checkpoints (model, optimizer, scheduler, RNG, data position) ->
save the best student (`save_pretrained`) with its test metrics.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import get_scheduler

from recdistill.models.distillation import DistillationObjective
from recdistill.models.release import block_dims, build_student, save_distilled
from recdistill.trainer.config import ConfigError, checked_config, parse_job_args, start_run_dir
from recdistill.trainer.data.pipeline import load_sequences
from recdistill.trainer.data.sequence_stream import SequenceStream
from recdistill.trainer.data.shard_stream import (
    DEVICE_GATHER_WORKERS,
    TeacherShardStream,
    batch_to_device,
    iter_batches,
    make_loader,
    shared_memory_warning,
)
from recdistill.trainer.data.shards import ITEM_TABLE_FILE, ShardError, load_manifest, sha256_file
from recdistill.trainer.deepspeed_host import local_world_size
from recdistill.trainer.defaults import DISTILL as DEFAULTS
from recdistill.trainer.evaluation import all_reduce_sums, eval_split, ranking_sums
from recdistill.trainer.inputs import (
    choice,
    data_stats,
    existing_dir,
    fresh_or_resumed,
    required,
)
from recdistill.trainer.metrics import finalize
from recdistill.trainer.requeue import STOP_FILE
from recdistill.trainer.shutdown import run_and_exit

LR_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def parse_args(argv=None):
    return parse_job_args(
        __doc__,
        "distill",
        "loss.ranking.enabled=true train.lr=5e-4",
        argv,
        resume=True,
        deepspeed=False,
    )


def check_inputs(cfg: dict, resume: bool) -> str:
    """Everything that can be wrong before a rank starts; a one-line summary when all is well."""
    from recdistill.models import STUDENTS

    data_cfg, student_cfg = cfg["data"], cfg["student"]
    choice(cfg, "train.lr_schedule", list(LR_SCHEDULES))
    choice(cfg, "shards.mode", ["exact", "resampled"])
    choice(cfg, "shards.on_error", ["raise", "skip"])
    choice(cfg, "shards.gather", ["host", "device"])
    choice(cfg, "shards.map_files", [True, False])
    if cfg["shards"]["gather"] == "device" and cfg["shards"]["workers"] > 0:
        raise ConfigError(DEVICE_GATHER_WORKERS)
    choice(cfg, "student.architecture", list(STUDENTS))
    choice(cfg, "train.mixed_precision", ["no", "bf16", "fp16"])
    output_dir = required(cfg, "train.output_dir")
    stats = data_stats(required(cfg, "data.dir"))
    if cfg["shards"]["dir"] is None:
        return check_without_teacher(cfg, stats, resume)
    shard_dir = Path(cfg["shards"]["dir"])
    manifest = load_manifest(shard_dir)
    check_shards_match_data(shard_dir, manifest, stats, verify_checksums=False)
    if student_cfg["architecture"] == "llama" and student_cfg["init"] == "teacher":
        existing_dir(student_cfg["teacher_dir"], "student.teacher_dir")
    if cfg["loss"]["alignment"]["enabled"] and not manifest["hidden_layers"]:
        raise ShardError(f"{shard_dir}: loss.alignment needs hidden states; the shards hold none")
    fresh_or_resumed(output_dir, "train.output_dir", resume)
    return (
        f"{shard_dir}: {manifest['examples']} examples in {len(manifest['shards'])} shards match "
        f"{data_cfg['dir']} ({stats['items']} items); {student_cfg['architecture']} student -> {output_dir}"
    )


def teacher_terms(loss_cfg: dict) -> list[str]:
    """The switched-on terms that read teacher outputs."""
    on = [
        name
        for name in ("ranking", "embedding", "logits", "alignment")
        if loss_cfg[name]["enabled"]
    ]
    return on + (["reliability"] if loss_cfg["reliability"] != "none" else [])


def check_without_teacher(cfg: dict, stats: dict, resume: bool) -> str:
    """shards.dir null: a plain student from the prepared sequences, so no teacher term."""
    needing = teacher_terms(cfg["loss"])
    if needing:
        raise ConfigError(
            f"shards.dir is null (no teacher), but loss {', '.join(needing)} read teacher "
            "outputs: set shards.dir to a trainer/precompute.py folder, or switch them off"
        )
    if cfg["student"]["architecture"] == "llama" and cfg["student"]["init"] == "teacher":
        existing_dir(cfg["student"]["teacher_dir"], "student.teacher_dir")
    fresh_or_resumed(cfg["train"]["output_dir"], "train.output_dir", resume)
    return (
        f"no teacher shards: plain {cfg['student']['architecture']} student from "
        f"{cfg['data']['dir']} ({stats['users']} users, {stats['items']} items) -> "
        f"{cfg['train']['output_dir']}"
    )


# ---- parts ---------------------------------------------------------------------------------


def check_shards_match_data(
    shard_dir: Path, manifest: dict, stats: dict, verify_checksums: bool
) -> None:
    if (
        manifest["item_vocab_sha256"] != stats["item_vocab_sha256"]
        or manifest["num_items"] != stats["items"]
    ):
        raise ShardError(
            f"{shard_dir}: teacher shards were computed over another item vocabulary "
            f"({manifest['num_items']} items, sha256 {manifest['item_vocab_sha256'][:12]}) than the data "
            f"({stats['items']} items, sha256 {stats['item_vocab_sha256'][:12]})"
        )
    for shard in manifest["shards"]:
        path = shard_dir / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise ShardError(
                f"{path}: missing or not the size the manifest records ({shard['bytes']} bytes)"
            )
        if verify_checksums and sha256_file(path) != shard["sha256"]:
            raise ShardError(f"{path}: sha256 differs from the manifest")


class TrainState:
    """Loop position and early-stopping state, checkpointed by Accelerate with everything else."""

    def __init__(self):
        self.values = {
            "step": 0,
            "epoch": 0,
            "batch_in_epoch": 0,
            "best_ndcg": -1.0,
            "bad_evals": 0,
            "stopped": False,
            "skipped_shards": 0,
            "worker_positions": [],
        }

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: dict) -> None:
        self.values.update(state)


class LossWatch:
    """Stops the job when a configured distillation term is NaN, or 0 for a whole logging window
    (SLMRec's own code silently trains without distillation when a term fails). It sees each
    window's mean of every term: terms are never negative, so a mean of 0 is 0 at every step."""

    def __init__(self, expected: list[str], window: int, may_be_zero: tuple[str, ...] = ()):
        # may_be_zero: terms a rule can switch off for whole windows (loss.reliability), checked
        # for NaN and presence only
        self.expected, self.window, self.may_be_zero = expected, window, may_be_zero

    def update(self, terms: dict[str, float], step: int) -> None:
        for name, value in terms.items():
            if not math.isfinite(value):
                raise RuntimeError(
                    f"steps {step - self.window + 1}-{step}: loss term {name!r} is {value}"
                )
        for name in self.expected:
            if name not in terms:
                raise RuntimeError(
                    f"step {step}: loss term {name!r} is configured on but was not computed"
                )
        dead = [
            name for name in self.expected if terms[name] == 0.0 and name not in self.may_be_zero
        ]
        if dead:
            raise RuntimeError(
                f"step {step}: loss term(s) {dead} configured on but 0 for the last {self.window} steps: "
                "check that the shards carry the teacher outputs they need"
            )


def expected_terms(loss_cfg: dict) -> list[str]:
    names = ["next_item"]
    if loss_cfg["dros"]["enabled"]:
        names.append("dros")
    if loss_cfg["ranking"]["enabled"]:
        names.append("ranking")
    if loss_cfg["logits"]["enabled"]:
        names.append("logits")
    align = loss_cfg["alignment"]
    if align["enabled"]:
        names += [name for name in ("align_cos", "align_l2") if align[f"{name[6:]}_weight"] > 0]
        if align["multi_supervision_weight"] > 0:
            names.append("multi_supervision")
    return names


def gated_terms(loss_cfg: dict) -> tuple[str, ...]:
    """The terms loss.reliability keeps to the rows where the teacher knows better: with a
    student ahead of its teacher everywhere in a window they are rightly 0."""
    if loss_cfg["reliability"] == "none":
        return ()
    return ("ranking", "logits", "align_cos", "align_l2")


def latest_checkpoint(checkpoints: Path) -> Path | None:
    done = sorted(
        p for p in checkpoints.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
    )
    return done[-1] if done else None


def resume_position_warning(recorded: list[dict], stream, epoch: int) -> str | None:
    """Why the rest of a resumed epoch will not be the interrupted run's batches, or None. The
    checkpoint records where rank 0's readers were (shard and offset per worker); the stream maps
    the same position again from this run's settings, and other workers, batch size, processes or
    group size map it elsewhere (said, not refused: only that epoch's remainder differs)."""
    if not recorded or stream.mode != "exact" or stream.rank != 0:
        return None
    current = stream.worker_positions()
    if current == recorded:
        return None

    def where(positions: list[dict]) -> str:
        return ", ".join(f"worker {p['worker']} {p['shard']} +{p['offset']}" for p in positions)

    return (
        f"warning: the checkpoint's readers were at {where(recorded)}; this run's settings put them "
        f"at {where(current)} (shards.workers, train.batch_size, the number of processes or the "
        f"loader's group size changed): the rest of epoch {epoch} is not the batches the "
        "interrupted run would have drawn (some samples may repeat or be left out), later epochs "
        "are as planned"
    )


def next_batch(batches, state: dict, accelerator):
    """The next batch, counting and logging the damaged shards the stream reports on the way."""
    for item in batches:
        if "item_ids" in item:
            return item
        for reason in item["skipped_shards"]:
            state["skipped_shards"] += 1
            print(
                f"rank {accelerator.process_index}: skipped damaged shard "
                f"({state['skipped_shards']} on this rank): {reason}",
                file=sys.stderr,
            )
    return None


class TermWindow:
    """Loss terms summed on the device over a logging window: the host reads them (one
    all-reduce, one sync) only when the window is logged, never per step."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_steps, self.samples, self.started = 0, 0, time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], samples: int) -> None:
        for name, value in terms.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.micro_steps += 1
        self.samples += samples

    def reduce(self, accelerator, skipped_shards: int, stop_flag: bool) -> tuple[dict, int, bool]:
        """(mean of each term over the window and the ranks, skipped shards of all ranks, whether
        any rank was asked to stop): one all-reduce for all of it."""
        names = list(self.sums)
        local = torch.stack(
            [self.sums[n] / max(1, self.micro_steps) for n in names]
            + [torch.tensor(float(skipped_shards), device=self.device)]
            + [torch.tensor(float(stop_flag), device=self.device)]
        )
        summed = accelerator.reduce(local, reduction="sum").tolist()
        world = accelerator.num_processes
        terms = {name: value / world for name, value in zip(names, summed)}
        return terms, int(summed[-2]), summed[-1] > 0


# ---- the job -------------------------------------------------------------------------------


def make_accelerator(train_cfg: dict, output_dir: Path) -> Accelerator:
    accelerator = Accelerator(
        gradient_accumulation_steps=train_cfg["grad_accum"],
        mixed_precision=train_cfg["mixed_precision"],
        log_with="tensorboard",
        project_dir=str(output_dir),
    )
    if accelerator.device.type == "cpu":  # ranks share the cores: oversubscription is 10x slower
        cores_per_rank = max(1, (os.cpu_count() or 1) // accelerator.num_processes)
        torch.set_num_threads(train_cfg["cpu_threads"] or cores_per_rank)
    set_seed(train_cfg["seed"])
    return accelerator


def training_target_counts(train_items, num_items: int) -> torch.Tensor:
    """[N + 1] how often each item is a next-item target in training (all but the first item of
    each training sequence): DROS's popularity."""
    targets = [np.asarray(items[1:], dtype=np.int64) for items in train_items if len(items) > 1]
    flat = np.concatenate(targets) if targets else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(np.bincount(flat, minlength=num_items + 1))


def build_objective(cfg: dict, num_items: int, shard_dir: Path, manifest: dict, splits=None):
    """The student with its distillation parts, and its AdamW."""
    loss_cfg, train_cfg = cfg["loss"], cfg["train"]
    target_counts = (
        training_target_counts(splits["train"]["items"], num_items)
        if loss_cfg["dros"]["enabled"]
        else None
    )
    student = build_student(cfg["student"], num_items, cfg["data"]["max_len"])
    teacher_table = (
        load_file(str(shard_dir / ITEM_TABLE_FILE))["weight"]
        if loss_cfg["embedding"]["enabled"]
        else None
    )
    objective = DistillationObjective(
        student, loss_cfg, manifest, teacher_table, block_dims(student), target_counts
    )
    optimizer = torch.optim.AdamW(
        objective.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"]
    )
    return objective, optimizer


def build_stream(cfg: dict, shard_dir, manifest, rank: int, world: int, splits):
    """This rank's shard stream (or, without shards, its stream of the prepared sequences) and
    the job's optimizer steps (the same on every rank)."""
    shard_cfg, train_cfg = cfg["shards"], cfg["train"]
    if shard_dir is None:
        stream = SequenceStream(
            splits["train"]["items"],
            cfg["data"]["max_len"],
            rank,
            world,
            train_cfg["batch_size"],
            train_cfg["seed"],
        )
        shard_dir = Path(cfg["data"]["dir"])  # named in the errors below
    else:
        stream = TeacherShardStream(
            shard_dir,
            manifest,
            rank,
            world,
            train_cfg["batch_size"],
            shard_cfg["workers"],
            train_cfg["seed"],
            shard_cfg["mode"],
            shard_cfg["shuffle_buffer"],
            shard_cfg["on_error"],
            shard_cfg["cache_mb"],
            shard_cfg["gather"],
            shard_cfg["map_files"],
        )
    micro_per_epoch = [stream.steps_per_epoch(epoch) for epoch in range(train_cfg["epochs"])]
    if min(micro_per_epoch) < train_cfg["grad_accum"]:
        raise ShardError(
            f"{shard_dir}: too few samples for one step of {world} x {train_cfg['batch_size']}"
        )
    total_steps = train_cfg["max_steps"] or sum(
        n // train_cfg["grad_accum"] for n in micro_per_epoch
    )
    return stream, total_steps


def build_scheduler(train_cfg: dict, optimizer, total_steps: int, world: int):
    # Accelerate's prepared scheduler advances once per process at every optimizer step.
    return get_scheduler(
        LR_SCHEDULES[train_cfg["lr_schedule"]],
        optimizer,
        num_warmup_steps=train_cfg["warmup_steps"] * world,
        num_training_steps=total_steps * world,
    )


def save_checkpoint(accelerator, checkpoints: Path, state: dict, stream, keep: int) -> None:
    """Accelerate's save_state (model, optimizer, scheduler, RNG, TrainState) under step-N; a kill
    mid-save leaves only a .tmp, never a broken latest."""
    stream.set_position(state["epoch"], state["batch_in_epoch"])
    state["worker_positions"] = stream.worker_positions()
    target = checkpoints / f"step-{state['step']:07d}"
    scratch = target.with_name(target.name + ".tmp")
    accelerator.save_state(str(scratch))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(scratch, target)
        for old in sorted(checkpoints.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def write_metrics(accelerator, output_dir: Path, record: dict) -> None:
    if accelerator.is_main_process:  # one line per logging window, one per validation
        with open(output_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def evaluate_split(model, accelerator, examples: list, seen: list | None, batch_size: int) -> dict:
    """Full-ranking metrics of the student over a split, every rank scoring its share."""
    model.eval()
    sums = ranking_sums(
        model.rank_targets,
        examples,
        batch_size,
        accelerator.device,
        accelerator.process_index,
        accelerator.num_processes,
        seen=seen,
    )
    model.train()
    return finalize(all_reduce_sums(sums, accelerator.device))


def log_window(
    accelerator, window: TermWindow, state: dict, step: int, scheduler, watch, output_dir
):
    """The loop's only host sync: the window's terms, skipped shards and the stop request in one
    all-reduce; a metrics line. True when a rank was asked to stop (the Slurm USR1 trap)."""
    asked = accelerator.is_main_process and (output_dir / STOP_FILE).exists()
    means, skipped, stop = window.reduce(accelerator, state["skipped_shards"], asked)
    watch.update(means, step)
    record = {f"loss/{k}": v for k, v in means.items()}
    record["samples_per_s"] = window.samples / (time.perf_counter() - window.started)
    record["lr"] = scheduler.get_last_lr()[0]
    record["skipped_shards"] = skipped
    accelerator.log(record, step=step)
    write_metrics(
        accelerator,
        output_dir,
        {"step": step, "micro_steps": window.micro_steps, "terms": means, **record},
    )
    window.reset()
    return stop, record


def validate(model, accelerator, split: tuple, state: dict, step: int, train_cfg, output_dir):
    """Validation, the best weights kept in best.safetensors, early stopping after `patience`."""
    valid = evaluate_split(model, accelerator, *split, train_cfg["eval_batch_size"])
    valid_record = {f"valid/{k}": v for k, v in valid.items()}
    accelerator.log(valid_record, step=step)
    write_metrics(accelerator, output_dir, {"step": step, **valid_record})  # the curve
    if valid["ndcg@10"] > state["best_ndcg"]:
        state["best_ndcg"], state["bad_evals"] = valid["ndcg@10"], 0
        if accelerator.is_main_process:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                str(output_dir / "best.safetensors"),
            )
    else:
        state["bad_evals"] += 1
        state["stopped"] = state["bad_evals"] >= train_cfg["patience"]
    return valid


def save_release(model, accelerator, cfg: dict, state: dict, test: dict, output_dir: Path) -> None:
    """OUTPUT/final: the best student (save_pretrained), its distillation parts, test metrics;
    staged and renamed, so a kill never leaves a half-written release."""
    if not accelerator.is_main_process:
        return
    staging = output_dir / "final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    save_distilled(model, staging, cfg)
    metrics = {
        "student": test,
        "best_valid_ndcg@10": state["best_ndcg"],
        "steps": state["step"],
        "skipped_shards": state["skipped_shards"],
        "terms": expected_terms(cfg["loss"]),
    }
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(output_dir / "final", ignore_errors=True)
    os.replace(staging, output_dir / "final")
    print(json.dumps({"test": test}))


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = checked_config(args, DEFAULTS, lambda cfg: check_inputs(cfg, args.resume))
    if cfg is None:  # --check
        return 0
    data_cfg, shard_cfg, train_cfg = cfg["data"], cfg["shards"], cfg["train"]
    output_dir = Path(train_cfg["output_dir"])
    checkpoints = output_dir / "checkpoints"
    accelerator = make_accelerator(train_cfg, output_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        start_run_dir(output_dir, cfg, args.resume)

    # ---- build: data, student + objective, shard stream, schedule
    shard_dir = Path(shard_cfg["dir"]) if shard_cfg["dir"] is not None else None
    manifest = load_manifest(shard_dir) if shard_dir is not None else None
    splits, stats = load_sequences(data_cfg["dir"])
    if shard_dir is not None and shard_cfg["verify_checksums"]:  # check_inputs did the sizes
        check_shards_match_data(shard_dir, manifest, stats, verify_checksums=True)
    max_len, exclude_history = data_cfg["max_len"], train_cfg["eval_exclude_history"]
    valid_split = eval_split(splits, "valid", max_len, exclude_history)
    test_split = eval_split(splits, "test", max_len, exclude_history)
    objective, optimizer = build_objective(cfg, stats["items"], shard_dir, manifest, splits)
    stream, total_steps = build_stream(cfg, shard_dir, manifest, rank, world, splits)
    scheduler = build_scheduler(train_cfg, optimizer, total_steps, world)
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    model = accelerator.unwrap_model(objective)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if args.resume and (latest := latest_checkpoint(checkpoints)) is not None:
        accelerator.load_state(str(latest))
        accelerator.print(
            f"resumed from {latest.name}: epoch {state.values['epoch']}, batch {state.values['batch_in_epoch']}"
        )
    accelerator.init_trackers("tensorboard")
    watch = LossWatch(
        expected_terms(cfg["loss"])[1:], train_cfg["log_every"], gated_terms(cfg["loss"])
    )
    s = state.values

    # ---- loop
    progress = tqdm(
        total=total_steps,
        initial=s["step"],
        desc="distill",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    window = TermWindow(accelerator.device)
    objective.train()
    # One loader for the whole job: the stream runs on across epochs by itself, and every rank
    # knows each epoch's batch count from the plan, so no step asks the other ranks anything.
    stream.set_position(s["epoch"], s["batch_in_epoch"])
    if warning := resume_position_warning(s["worker_positions"], stream, s["epoch"]):
        print(warning, file=sys.stderr)
    if isinstance(stream, TeacherShardStream) and accelerator.is_local_main_process:
        if warning := shared_memory_warning(stream, shard_cfg["prefetch"], local_world_size()):
            print(warning, file=sys.stderr)
    loader = make_loader(
        stream, pin_memory=accelerator.device.type == "cuda", prefetch=shard_cfg["prefetch"]
    )
    batches = iter_batches(loader, accelerator.device)
    while s["step"] < total_steps and not s["stopped"]:
        batch = next_batch(batches, s, accelerator)
        if batch is None:
            raise ShardError(f"{shard_dir}: the shard stream ended early on rank {rank}")
        batch = batch_to_device(batch, accelerator.device)
        with accelerator.accumulate(objective):
            terms = objective(batch)
            accelerator.backward(terms["total"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        window.add(terms, len(batch["lengths"]) * world)
        s["batch_in_epoch"] += 1
        if s["batch_in_epoch"] == stream.steps_per_epoch(s["epoch"]):
            s["epoch"], s["batch_in_epoch"] = s["epoch"] + 1, 0
        if not accelerator.sync_gradients:
            continue
        s["step"] += 1
        step = s["step"]
        progress.update(1)
        stop = False
        if step % train_cfg["log_every"] == 0 or step == total_steps:
            stop, record = log_window(accelerator, window, s, step, scheduler, watch, output_dir)
            progress.set_postfix(
                loss=f"{record['loss/total']:.4f}", samples_s=f"{record['samples_per_s']:.0f}"
            )
        if step % train_cfg["eval_every"] == 0 or step == total_steps:
            valid = validate(model, accelerator, valid_split, s, step, train_cfg, output_dir)
            if accelerator.is_main_process:
                progress.write(
                    f"step {step}: valid ndcg@10 {valid['ndcg@10']:.4f} hr@10 {valid['hr@10']:.4f}"
                )
        if step % train_cfg["save_every"] == 0:
            save_checkpoint(accelerator, checkpoints, s, stream, train_cfg["keep_checkpoints"])
        if train_cfg["kill_at_step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if stop:
            save_checkpoint(accelerator, checkpoints, s, stream, train_cfg["keep_checkpoints"])
            accelerator.print(f"stop requested: checkpointed step {step}, exiting to be requeued")
            accelerator.end_training()
            dist.destroy_process_group()
            return 0
    progress.close()

    # ---- save: the best weights, scored on test
    accelerator.wait_for_everyone()
    if (output_dir / "best.safetensors").is_file():
        model.load_state_dict(load_file(str(output_dir / "best.safetensors")))
    test = evaluate_split(model, accelerator, *test_split, train_cfg["eval_batch_size"])
    save_release(model, accelerator, cfg, s, test, output_dir)
    accelerator.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()  # left to interpreter exit, it can abort the process
    return 0


if __name__ == "__main__":
    run_and_exit(main)
