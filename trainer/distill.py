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

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import get_scheduler

from recdistill.models import STUDENTS, LlamaStudent
from recdistill.models.distillation import LOSS_DEFAULTS, DistillationObjective
from recdistill.models.student_io import load_student
from recdistill.trainer.config import load_config, start_run_dir
from recdistill.trainer.data.pipeline import load_sequences
from recdistill.trainer.data.shard_stream import (
    TeacherShardStream,
    batch_to_device,
    iter_batches,
    make_loader,
)
from recdistill.trainer.data.shards import ITEM_TABLE_FILE, ShardError, load_manifest, sha256_file
from recdistill.trainer.evaluate import all_reduce_sums, eval_split, ranking_sums
from recdistill.trainer.metrics import finalize
from recdistill.trainer.requeue import STOP_FILE
from recdistill.trainer.shutdown import run_and_exit

DEFAULTS: dict = {
    "data": {
        "dir": None,
        "max_len": 50,
    },  # the student's prepared data (validation, test, vocabulary)
    "shards": {
        "dir": None,  # trainer/precompute.py output
        "mode": "exact",  # exact (resumes mid-epoch exactly) | resampled (restart-safe, no data state)
        "workers": 2,  # DataLoader worker processes per rank (0: read in the training process)
        "prefetch": 4,  # batches each worker prepares ahead
        "shuffle_buffer": 1000,  # resampled mode's sample shuffle buffer
        "on_error": "raise",  # raise | skip (damaged shards skipped whole, counted and logged)
        "verify_checksums": False,  # sha256 of every shard at start (reads all of them once)
    },
    "student": {
        "architecture": "sasrec",  # sasrec | gru4rec | caser | llama
        "options": {},  # the architecture's config fields (hidden_size, num_blocks, dropout, ...)
        "init": "scratch",  # llama: scratch | teacher | base
        "teacher_dir": None,  # llama init=teacher: the teacher release folder
        "teacher_layers": [],  # llama init=teacher: 0-based teacher layers to copy
        "base_path": None,  # llama init=base: local base LLM checkpoint
        "num_layers": 2,  # llama init=base: first n layers
    },
    "loss": LOSS_DEFAULTS,
    "train": {
        "output_dir": None,
        "batch_size": 64,  # per rank
        "grad_accum": 1,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "lr_schedule": "linear",  # after warm-up: linear (to 0 at the end) | cosine | constant
        "epochs": 10,
        "max_steps": None,
        "seed": 0,
        "mixed_precision": "no",  # no | bf16 | fp16
        "log_every": 10,
        "eval_every": 100,
        "eval_batch_size": 256,
        "eval_exclude_history": False,  # rank out every item of the user's whole history
        "save_every": 100,
        "keep_checkpoints": 2,
        "patience": 5,
        "kill_at_step": None,  # fault injection for tests: SIGKILL after that optimizer step
        "cpu_threads": None,  # CPU: torch threads per rank (None: the cores / local ranks)
    },
}
LR_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
DISTILL_FILE = "distillation.json"
COLLABORATIVE_FILE = "collaborative_embedding.safetensors"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="distillation config (YAML or JSON); see configs/"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in OUTPUT/checkpoints",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides, e.g. loss.ranking.enabled=true train.lr=5e-4",
    )
    return parser.parse_args(argv)


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


def build_student(student_cfg: dict, num_items: int, max_len: int):
    architecture = student_cfg["architecture"]
    if architecture not in STUDENTS:
        raise ValueError(
            f"student.architecture {architecture!r}: choose one of {', '.join(STUDENTS)}"
        )
    if architecture == "llama" and student_cfg["init"] == "teacher":
        return LlamaStudent.from_teacher(
            student_cfg["teacher_dir"], list(student_cfg["teacher_layers"]), max_len
        )
    if architecture == "llama" and student_cfg["init"] == "base":
        return LlamaStudent.from_base(
            student_cfg["base_path"], student_cfg["num_layers"], num_items, max_len=max_len
        )
    config_class, model_class = STUDENTS[architecture]
    return model_class(config_class(num_items=num_items, max_len=max_len, **student_cfg["options"]))


def block_dims(student) -> list[int]:
    """Width of each student block's output, read off one tiny forward."""
    with torch.no_grad():
        was_training = student.training
        out = student.eval()(torch.ones(1, 2, dtype=torch.long), torch.tensor([2]))
        student.train(was_training)
    return [state.shape[-1] for state in out.block_states]


def save_distilled(objective: DistillationObjective, directory: Path, cfg: dict) -> None:
    """The student's own files, plus what evaluation needs of the distillation (the collaborative
    embedding, which changes the item table)."""
    objective.student.save_pretrained(directory)
    if objective.collaborative is not None:
        save_file(
            {
                k: v.detach().cpu().contiguous()
                for k, v in objective.collaborative.state_dict().items()
            },
            str(directory / COLLABORATIVE_FILE),
        )
    (directory / DISTILL_FILE).write_text(json.dumps({"loss": cfg["loss"]}, indent=2) + "\n")


def load_distilled(directory: str | Path) -> DistillationObjective:
    """A student release ready to score (with its collaborative embedding when it has one)."""
    directory = Path(directory)
    student = load_student(directory)
    loss_cfg = (
        json.loads((directory / DISTILL_FILE).read_text())["loss"]
        if (directory / DISTILL_FILE).is_file()
        else LOSS_DEFAULTS
    )
    inference_cfg = {
        **LOSS_DEFAULTS,
        "chunk_size": loss_cfg.get("chunk_size", 8192),
        "embedding": loss_cfg.get("embedding", LOSS_DEFAULTS["embedding"]),
    }
    teacher_table = None
    if inference_cfg["embedding"]["enabled"]:
        teacher_table = load_file(str(directory / COLLABORATIVE_FILE))["teacher_table"]
    objective = DistillationObjective(student, inference_cfg, None, teacher_table)
    if objective.collaborative is not None:
        objective.collaborative.load_state_dict(load_file(str(directory / COLLABORATIVE_FILE)))
    return objective.eval()


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

    def __init__(self, expected: list[str], window: int):
        self.expected, self.window = expected, window

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
        dead = [name for name in self.expected if terms[name] == 0.0]
        if dead:
            raise RuntimeError(
                f"step {step}: loss term(s) {dead} configured on but 0 for the last {self.window} steps: "
                "check that the shards carry the teacher outputs they need"
            )


def expected_terms(loss_cfg: dict) -> list[str]:
    names = ["next_item"]
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


def latest_checkpoint(checkpoints: Path) -> Path | None:
    done = sorted(
        p for p in checkpoints.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
    )
    return done[-1] if done else None


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


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides, DEFAULTS)
    data_cfg, shard_cfg, train_cfg, loss_cfg = cfg["data"], cfg["shards"], cfg["train"], cfg["loss"]
    if train_cfg["lr_schedule"] not in LR_SCHEDULES:
        raise SystemExit(
            f"train.lr_schedule {train_cfg['lr_schedule']!r}: use one of {', '.join(LR_SCHEDULES)}"
        )
    output_dir = Path(train_cfg["output_dir"])
    checkpoints = output_dir / "checkpoints"
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
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        start_run_dir(output_dir, cfg, args.resume)

    shard_dir = Path(shard_cfg["dir"])
    manifest = load_manifest(shard_dir)
    splits, stats = load_sequences(data_cfg["dir"])
    check_shards_match_data(shard_dir, manifest, stats, shard_cfg["verify_checksums"])
    max_len, exclude_history = data_cfg["max_len"], train_cfg["eval_exclude_history"]
    valid_examples, valid_seen = eval_split(splits, "valid", max_len, exclude_history)
    test_examples, test_seen = eval_split(splits, "test", max_len, exclude_history)

    student = build_student(cfg["student"], stats["items"], data_cfg["max_len"])
    teacher_table = (
        load_file(str(shard_dir / ITEM_TABLE_FILE))["weight"]
        if loss_cfg["embedding"]["enabled"]
        else None
    )
    objective = DistillationObjective(
        student, loss_cfg, manifest, teacher_table, block_dims(student)
    )
    optimizer = torch.optim.AdamW(
        objective.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"]
    )

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
    )
    micro_per_epoch = [stream.steps_per_epoch(epoch) for epoch in range(train_cfg["epochs"])]
    if min(micro_per_epoch) < train_cfg["grad_accum"]:
        raise SystemExit(
            f"{shard_dir}: too few samples for one step of {world} x {train_cfg['batch_size']}"
        )
    total_steps = train_cfg["max_steps"] or sum(
        n // train_cfg["grad_accum"] for n in micro_per_epoch
    )
    # Accelerate's prepared scheduler advances once per process at every optimizer step.
    scheduler = get_scheduler(
        LR_SCHEDULES[train_cfg["lr_schedule"]],
        optimizer,
        num_warmup_steps=train_cfg["warmup_steps"] * world,
        num_training_steps=total_steps * world,
    )

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
    watch = LossWatch(expected_terms(loss_cfg)[1:], train_cfg["log_every"])
    s = state.values

    def save_checkpoint() -> None:
        stream.set_position(s["epoch"], s["batch_in_epoch"])
        s["worker_positions"] = stream.worker_positions()
        target = checkpoints / f"step-{s['step']:07d}"
        scratch = target.with_name(target.name + ".tmp")
        accelerator.save_state(str(scratch))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.replace(scratch, target)  # a kill mid-save leaves only a .tmp, never a broken latest
            for old in sorted(checkpoints.glob("step-*"))[: -train_cfg["keep_checkpoints"]]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def write_metrics(record: dict) -> None:
        if accelerator.is_main_process:  # one line per record: every term every step, validations
            with open(output_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def evaluate_split(examples: list, seen: list | None) -> dict:
        model.eval()
        sums = ranking_sums(
            model.rank_targets,
            examples,
            train_cfg["eval_batch_size"],
            accelerator.device,
            rank,
            world,
            seen=seen,
        )
        model.train()
        return finalize(all_reduce_sums(sums, accelerator.device))

    progress = tqdm(
        total=total_steps,
        initial=s["step"],
        desc="distill",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    window = TermWindow(accelerator.device)
    log_every = train_cfg["log_every"]
    objective.train()
    # One loader for the whole job: the stream runs on across epochs by itself, and every rank
    # knows each epoch's batch count from the plan, so no step asks the other ranks anything.
    stream.set_position(s["epoch"], s["batch_in_epoch"])
    loader = make_loader(
        stream, pin_memory=accelerator.device.type == "cuda", prefetch=shard_cfg["prefetch"]
    )
    batches = iter_batches(loader)
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
        if step % log_every == 0 or step == total_steps:
            # The only host sync of a training step, every log_every steps: terms, skipped shards
            # and the stop request travel in one all-reduce.
            asked = accelerator.is_main_process and (output_dir / STOP_FILE).exists()
            means, skipped, stop = window.reduce(accelerator, s["skipped_shards"], asked)
            watch.update(means, step)
            record = {f"loss/{k}": v for k, v in means.items()}
            record["samples_per_s"] = window.samples / (time.perf_counter() - window.started)
            record["lr"] = scheduler.get_last_lr()[0]
            record["skipped_shards"] = skipped
            accelerator.log(record, step=step)
            write_metrics(
                {"step": step, "micro_steps": window.micro_steps, "terms": means, **record}
            )
            progress.set_postfix(
                loss=f"{means['total']:.4f}", samples_s=f"{record['samples_per_s']:.0f}"
            )
            window.reset()
        if step % train_cfg["eval_every"] == 0 or step == total_steps:
            valid = evaluate_split(valid_examples, valid_seen)
            valid_record = {f"valid/{k}": v for k, v in valid.items()}
            accelerator.log(valid_record, step=step)
            write_metrics({"step": step, **valid_record})  # the curve, beside the terms
            if valid["ndcg@10"] > s["best_ndcg"]:
                s["best_ndcg"], s["bad_evals"] = valid["ndcg@10"], 0
                if accelerator.is_main_process:
                    save_file(
                        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                        str(output_dir / "best.safetensors"),
                    )
            else:
                s["bad_evals"] += 1
                s["stopped"] = s["bad_evals"] >= train_cfg["patience"]
            if accelerator.is_main_process:
                progress.write(
                    f"step {step}: valid ndcg@10 {valid['ndcg@10']:.4f} hr@10 {valid['hr@10']:.4f}"
                )
        if step % train_cfg["save_every"] == 0:
            save_checkpoint()
        if train_cfg["kill_at_step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if stop:
            save_checkpoint()
            accelerator.print(f"stop requested: checkpointed step {step}, exiting to be requeued")
            accelerator.end_training()
            dist.destroy_process_group()
            return 0
    progress.close()

    accelerator.wait_for_everyone()
    if (output_dir / "best.safetensors").is_file():
        model.load_state_dict(load_file(str(output_dir / "best.safetensors")))
    test = evaluate_split(test_examples, test_seen)
    if accelerator.is_main_process:
        staging = output_dir / "final.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        save_distilled(model, staging, cfg)
        metrics = {
            "student": test,
            "best_valid_ndcg@10": s["best_ndcg"],
            "steps": s["step"],
            "skipped_shards": s["skipped_shards"],
            "terms": expected_terms(loss_cfg),
        }
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        shutil.rmtree(output_dir / "final", ignore_errors=True)
        os.replace(staging, output_dir / "final")
        print(json.dumps({"test": test}))
    accelerator.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()  # left to interpreter exit, it can abort the process
    return 0


if __name__ == "__main__":
    run_and_exit(main)
