"""Fine-tune the LLM teacher for next-item prediction with DeepSpeed (ZeRO-3 by default).

    deepspeed --num_gpus 8 trainer/teacher.py --config configs/teacher_llama7b.yaml [key=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 trainer/teacher.py --config configs/teacher_demo.yaml

Recipe: parse config -> build data, model (under zero.Init for ZeRO-3) and the DeepSpeed engine
-> train with gradient accumulation, warmup + decay, periodic full-ranking validation and early
stopping on NDCG@10 -> DeepSpeed checkpoints for exact resume (--resume) -> at the end the best
weights as one consolidated 16-bit HF-style checkpoint (config + safetensors) in OUTPUT/final,
with the item map and the run config, plus test metrics of the teacher and a popularity baseline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm
from transformers.integrations import HfDeepSpeedConfig

from recdistill.models.release import load_student
from recdistill.models.teacher import (
    LLMRecTeacher,
    TeacherConfig,
    backbone_matmul_params,
    import_backbone_modules,
    save_teacher_files,
    train_flops,
)
from recdistill.trainer.config import (
    ConfigError,
    checked_config,
    parse_job_args,
    save_config,
    start_run_dir,
)
from recdistill.trainer.data.batches import (
    global_batch_order,
    micro_batches,
    prefix_batch,
    select_prefixes,
    sequence_batch,
)
from recdistill.trainer.data.pipeline import (
    ITEM_MAP_FILE,
    item_vocabulary,
    load_sequences,
    whole_sequences,
)
from recdistill.trainer.deepspeed_host import init_distributed, local_world_size
from recdistill.trainer.defaults import TEACHER as DEFAULTS
from recdistill.trainer.evaluation import (
    all_reduce_sums,
    eval_split,
    popularity_metrics,
    ranking_sums,
)
from recdistill.trainer.inputs import (
    choice,
    data_stats,
    existing_dir,
    existing_file,
    fresh_or_resumed,
    required,
)
from recdistill.trainer.metrics import finalize
from recdistill.trainer.requeue import stop_requested
from recdistill.trainer.shutdown import run_and_exit
from recdistill.trainer.throughput import peak_tflops, throughput_record


def parse_args(argv=None):
    return parse_job_args(
        __doc__, "teacher", "train.lr=3e-4 data.max_len=20", argv, resume=True, deepspeed=True
    )


def check_inputs(cfg: dict, resume: bool) -> str:
    """Everything that can be wrong before a rank starts; a one-line summary when all is well."""
    model_cfg = cfg["model"]
    choice(cfg, "data.mode", ["sequence", "prefix"])
    output_dir = required(cfg, "train.output_dir")
    stats = data_stats(required(cfg, "data.dir"))
    ds_path = existing_file(cfg["train"]["deepspeed_config"], "train.deepspeed_config")
    try:
        json.loads(ds_path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"train.deepspeed_config {ds_path}: not JSON ({error})") from None
    if model_cfg["backbone_path"]:
        existing_dir(model_cfg["backbone_path"], "model.backbone_path")
    elif not model_cfg["backbone"]:
        raise ConfigError(
            "set model.backbone_path (a local HF checkpoint) or model.backbone (a config)"
        )
    if model_cfg["item_embeddings"]:
        table = read_item_table(model_cfg["item_embeddings"])
        wanted = (stats["items"] + 1, model_cfg["item_dim"])
        if tuple(table.shape) != wanted:
            raise ConfigError(
                f"model.item_embeddings {model_cfg['item_embeddings']}: an item table of shape "
                f"{tuple(table.shape)}, the teacher needs {wanted} (items + 1 padding row, "
                "model.item_dim): trained on other data, or another width?"
            )
    if model_cfg["item_features"]:
        rows, _ = item_features_shape(model_cfg["item_features"])
        if rows != stats["items"] + 1:
            raise ConfigError(
                f"model.item_features {model_cfg['item_features']}: {rows} rows, the "
                f"data has {stats['items']} items (+1 padding row): made for another vocabulary?"
            )
    if model_cfg["prompt"]["tokenizer"]:
        existing_dir(model_cfg["prompt"]["tokenizer"], "model.prompt.tokenizer")
    fresh_or_resumed(output_dir, "train.output_dir", resume)
    extra = extra_sequences(cfg["data"]["dir"], cfg["data"]["extra_dirs"])
    backbone = model_cfg["backbone_path"] or model_cfg["backbone"].get("model_type", "config")
    users = f"{stats['users']} users" + (f" (+{len(extra)} from data.extra_dirs)" if extra else "")
    return (
        f"{cfg['data']['dir']}: {users}, {stats['items']} items; {backbone} teacher -> {output_dir}"
    )


# ---- parts ---------------------------------------------------------------------------------


def extra_sequences(data_dir: str, extra_dirs: list) -> list[list[int]]:
    """The whole sequences of the users in `data.extra_dirs`, in data.dir's item ids (matched by
    raw id; items data.dir lacks are dropped). More users to learn the items from than the
    students see, as an LLM teacher brings knowledge from elsewhere. A folder sharing a user with
    data.dir is refused: that user's validation and test items would train the teacher."""
    if not extra_dirs:
        return []
    if not isinstance(extra_dirs, list):
        raise ConfigError(f"data.extra_dirs {extra_dirs!r}: a list of prepared data folders")
    splits, _ = load_sequences(data_dir)
    own_users, vocab = set(splits["train"]["user"]), item_vocabulary(data_dir)
    sequences = []
    for folder in extra_dirs:
        data_stats(folder, "data.extra_dirs")
        users, folder_sequences = whole_sequences(folder, vocab)
        shared = own_users.intersection(users)
        if shared:
            raise ConfigError(
                f"data.extra_dirs {folder}: {len(shared)} of its users are in data.dir too (e.g. "
                f"{min(shared)!r}); their held-out items would train the teacher"
            )
        kept = [items[items > 0].tolist() for items in folder_sequences]
        kept = [items for items in kept if len(items) >= 2]
        if not kept:
            raise ConfigError(
                f"data.extra_dirs {folder}: no user with two items of data.dir's vocabulary"
            )
        sequences += kept
    return sequences


def build_examples(splits, data_cfg: dict, extra: list | None = None) -> list:
    """Training examples for the mode: whole windows (sequence) or (prefix, next item) pairs, from
    the training split and the `extra` sequences (extra_sequences)."""
    max_len = data_cfg["max_len"]
    train_items = [items for items in splits["train"]["items"] if len(items) >= 2]
    train_items += extra or []
    if data_cfg["mode"] == "sequence":
        train = [items[-(max_len + 1) :] for items in train_items]
    else:
        train = [
            (items[max(0, t - max_len) : t], items[t])
            for items in train_items
            for t in select_prefixes(len(items), data_cfg["prefixes"])
        ]
    return train


def collate(examples: list, mode: str, device) -> dict:
    batch = sequence_batch(examples) if mode == "sequence" else prefix_batch(*zip(*examples))
    return {key: value.to(device) for key, value in batch.items()}


def prompt_ids(prompt: dict) -> tuple[list[int], list[int]]:
    if prompt.get("tokenizer"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(prompt["tokenizer"], local_files_only=True)
        return (
            tokenizer(prompt["prefix"], add_special_tokens=True)["input_ids"],
            tokenizer(prompt["suffix"], add_special_tokens=False)["input_ids"],
        )
    return list(prompt["prefix_ids"]), list(prompt["suffix_ids"])


def teacher_config(model_cfg: dict, data_cfg: dict, num_items: int) -> TeacherConfig:
    backbone = dict(model_cfg["backbone"])
    if model_cfg["backbone_path"]:
        from transformers import AutoConfig

        backbone = AutoConfig.from_pretrained(
            model_cfg["backbone_path"], local_files_only=True
        ).to_dict()
    if not backbone:
        raise ValueError(
            "model.backbone (a config dict) or model.backbone_path (a local checkpoint) is required"
        )
    prefix_ids, suffix_ids = prompt_ids(model_cfg["prompt"])
    return TeacherConfig(
        num_items=num_items,
        backbone=backbone,
        backbone_path=model_cfg["backbone_path"],
        item_dim=model_cfg["item_dim"],
        item_init_std=model_cfg["item_init_std"],
        input_dropout=model_cfg["input_dropout"],
        tied_projection_init=model_cfg["tied_projection_init"],
        item_feature_dim=(
            item_features_shape(model_cfg["item_features"])[1] if model_cfg["item_features"] else 0
        ),
        mode=data_cfg["mode"],
        prompt_prefix_ids=prefix_ids,
        prompt_suffix_ids=suffix_ids,
        freeze_item_embeddings=model_cfg["freeze_item_embeddings"],
        lora=model_cfg["lora"],
        gradient_checkpointing=model_cfg["gradient_checkpointing"],
        score_chunk_size=model_cfg["score_chunk_size"],
    )


def deepspeed_config(train_cfg: dict, world_size: int, total_steps: int) -> dict:
    ds_config = json.loads(Path(train_cfg["deepspeed_config"]).read_text())
    ds_config["train_micro_batch_size_per_gpu"] = train_cfg["micro_batch_size"]
    ds_config["gradient_accumulation_steps"] = train_cfg["grad_accum"]
    ds_config["train_batch_size"] = (
        train_cfg["micro_batch_size"] * train_cfg["grad_accum"] * world_size
    )
    ds_config["optimizer"]["params"].update(
        lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"]
    )
    if ds_config.get("scheduler", {}).get("type") == "WarmupDecayLR":
        ds_config["scheduler"]["params"].update(
            warmup_max_lr=train_cfg["lr"],
            warmup_num_steps=min(train_cfg["warmup_steps"], max(total_steps - 1, 1)),
            total_num_steps=max(total_steps, 2),
        )
    return ds_config


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def item_features_shape(path: str) -> tuple[int, int]:
    """(N+1, F) of a trainer/item_features.py file, from its header: checking a config and
    sizing the model need no read of a catalogue-sized table (the model's build reads it)."""
    with safe_open(str(existing_file(path, "model.item_features")), framework="pt") as tensors:
        if "features" not in tensors.keys():
            raise ConfigError(
                f"model.item_features {path}: no `features` tensor (made by trainer/item_features.py?)"
            )
        rows, width = tensors.get_slice("features").get_shape()
    return rows, width


def load_item_features(path: str) -> torch.Tensor:
    """[N+1, F] `features` of a trainer/item_features.py file (row i = item id i)."""
    item_features_shape(path)  # the same clear error when the tensor is missing
    return load_file(str(path))["features"]


def read_item_table(path: str) -> torch.Tensor:
    """[N+1, d] a pretrained item table: a safetensors file (its `weight`, or its only tensor), or
    a student release folder (trainer/distill.py's `final/`, e.g. a plain SASRec's: E4SRec's and
    SLMRec's teacher reads the ID embeddings of a trained SASRec)."""
    if Path(path).is_dir():
        student = load_student(existing_dir(path, "model.item_embeddings"))
        return student.item_table().detach().float()
    tensors = load_file(str(existing_file(path, "model.item_embeddings")))
    if "weight" not in tensors and len(tensors) != 1:
        raise ConfigError(
            f"model.item_embeddings {path}: no `weight` tensor among {sorted(tensors)}"
        )
    return tensors.get("weight", next(iter(tensors.values())))


def load_item_embeddings(model: LLMRecTeacher, path: str) -> None:
    """Copy a pretrained item table (e.g. SASRec's) into the model, gathered under ZeRO-3."""
    table = read_item_table(path)
    weight = model.item_embeddings.weight
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
        if table.shape != weight.shape:
            raise ValueError(
                f"{path}: item table of shape {tuple(table.shape)}, model needs {tuple(weight.shape)}"
            )
        weight.data.copy_(table)


@torch.no_grad()
def evaluate(
    engine, examples: list, batch_size: int, seen: list | None, device
) -> dict[str, float]:
    """Full-ranking metrics (`seen` items ranked out); every rank runs the same number of
    batches (ZeRO-3 needs it)."""
    engine.eval()

    def rank_targets(ids, lengths, targets, exclude):
        out = engine(ids, lengths, targets=targets, score="last", exclude=exclude)
        return out.stats.target_ranks

    sums = ranking_sums(
        rank_targets,
        examples,
        batch_size,
        device,
        dist.get_rank(),
        dist.get_world_size(),
        seen=seen,
    )
    engine.train()
    return finalize(all_reduce_sums(sums, device))


class MetricsLog:
    """Rank 0 appends JSON lines (the record tests and the demo read) and TensorBoard scalars."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.jsonl = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115
            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for key, value in values.items():
            if isinstance(value, int | float):
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


# ---- the job -------------------------------------------------------------------------------


def start_ranks() -> torch.device:
    """The process group, and this rank's device (CPU ranks share the cores: oversubscribed
    threads make CPU runs 10x slower)."""
    init_distributed()
    device = torch.device(
        deepspeed.get_accelerator().device_name(), int(os.environ.get("LOCAL_RANK", 0))
    )
    if device.type != "cpu":
        deepspeed.get_accelerator().set_device(device.index)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))
    return device


def build_engine(config: TeacherConfig, model_cfg: dict, ds_config: dict):
    """The teacher built under zero.Init (ZeRO-3: partitioned as it is built, a 7B checkpoint
    loaded partitioned) and its DeepSpeed engine and scheduler."""
    import_backbone_modules(config)
    features = (
        load_item_features(model_cfg["item_features"]) if model_cfg["item_features"] else None
    )
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage(ds_config) == 3):
        model = LLMRecTeacher(config, item_features=features)
    if model_cfg["item_embeddings"]:
        load_item_embeddings(model, model_cfg["item_embeddings"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config
    )
    return engine, scheduler


def loop_state(engine, checkpoints: Path, resume: bool) -> dict:
    """The loop's position and early-stopping state: fresh, or from the latest checkpoint."""
    state = {
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,
        "best_ndcg": -1.0,
        "bad_evals": 0,
        "stopped": False,
    }
    if resume and (checkpoints / "latest").is_file():
        _, client_state = engine.load_checkpoint(str(checkpoints))
        state.update(client_state["state"])
        torch.set_rng_state(client_state["torch_rng"])
        if dist.get_rank() == 0:
            print(
                f"resumed from step {state['step']} (epoch {state['epoch']}, batch {state['batch_in_epoch']})"
            )
    return state


def consolidated_state_dict(engine) -> dict | None:
    """The whole model's weights on rank 0 (None on the others; every rank must call it). Under
    ZeRO-3 DeepSpeed gathers them one layer at a time, in the run's 16-bit dtype: what
    save_16bit_model writes, without a second copy written to disk and read back (rank 0 held
    the model twice, 4.6 GiB of a 1.1B teacher's release)."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if dist.get_rank() == 0 else None


def save_release(engine, cfg, config, splits, stats, state, test, test_split, log) -> None:
    """OUTPUT/final: the engine's weights consolidated to 16 bits (every rank takes part), saved
    HF-style with the item map, run config and test metrics; staged and renamed."""
    data_cfg, output_dir = cfg["data"], Path(cfg["train"]["output_dir"])
    test_examples, test_seen = test_split
    rank = dist.get_rank()
    final = output_dir / "final"
    staging = output_dir / "final.tmp"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    state_dict = consolidated_state_dict(engine)
    if rank == 0:
        staging.mkdir(parents=True)
        save_teacher_files(staging, config, state_dict)
        del state_dict
        shutil.copy(Path(data_cfg["dir"]) / ITEM_MAP_FILE, staging / ITEM_MAP_FILE)
        save_config(cfg, staging / "run_config.yaml")
        popularity = popularity_metrics(
            [s for s in splits["train"]["items"]], test_examples, stats["items"], test_seen
        )
        metrics = {
            "teacher": test,
            "popularity": popularity,
            "best_valid_ndcg@10": state["best_ndcg"],
            "steps": state["step"],
            "item_vocab_sha256": stats["item_vocab_sha256"],
        }
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if final.exists():  # a resumed run that had already finished: the new release replaces it
            shutil.rmtree(final)
        os.replace(staging, final)
        log.log(state["step"], {f"test/{k}": v for k, v in test.items()})
        print(json.dumps({"test": test, "popularity": popularity}))


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = checked_config(args, DEFAULTS, lambda cfg: check_inputs(cfg, args.resume))
    if cfg is None:  # --check
        return 0
    data_cfg, model_cfg, train_cfg = cfg["data"], cfg["model"], cfg["train"]
    output_dir = Path(train_cfg["output_dir"])
    checkpoints = output_dir / "checkpoints"

    device = start_ranks()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        start_run_dir(output_dir, cfg, args.resume)
    dist.barrier()

    splits, stats = load_sequences(data_cfg["dir"])
    extra = extra_sequences(data_cfg["dir"], data_cfg["extra_dirs"])
    train_examples = build_examples(splits, data_cfg, extra)
    max_len, exclude_history = data_cfg["max_len"], train_cfg["eval_exclude_history"]
    valid_examples, valid_seen = eval_split(splits, "valid", max_len, exclude_history)
    test_split = eval_split(splits, "test", max_len, exclude_history)
    global_batch = train_cfg["micro_batch_size"] * train_cfg["grad_accum"] * world
    steps_per_epoch = len(train_examples) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(
            f"{len(train_examples)} training examples < one global batch of {global_batch}"
        )
    total_steps = train_cfg["max_steps"] or train_cfg["epochs"] * steps_per_epoch

    torch.manual_seed(train_cfg["seed"])
    ds_config = deepspeed_config(train_cfg, world, total_steps)
    config = teacher_config(model_cfg, data_cfg, stats["items"])
    # Before HfDeepSpeedConfig: its zero.Init would try to partition the meta-device copy.
    matmul_params = backbone_matmul_params(config)
    # Keeping this object alive makes transformers build/load the backbone under zero.Init.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None  # noqa: F841
    engine, scheduler = build_engine(config, model_cfg, ds_config)
    state = loop_state(engine, checkpoints, args.resume)
    log = MetricsLog(output_dir, enabled=rank == 0)

    def checkpoint(tag: str, save_latest: bool = True) -> None:
        engine.save_checkpoint(
            str(checkpoints),
            tag=tag,
            client_state={"state": dict(state), "torch_rng": torch.get_rng_state()},
            save_latest=save_latest,
        )

    progress = tqdm(
        total=total_steps, initial=state["step"], disable=rank != 0, desc="teacher", unit="step"
    )
    half_precision = any(ds_config.get(key, {}).get("enabled") for key in ("bf16", "fp16"))
    peak = peak_tflops(device, train_cfg["peak_tflops"], half_precision)
    window_start, window_samples, window_flops = time.perf_counter(), 0, 0.0
    engine.train()
    while state["step"] < total_steps and not state["stopped"]:
        order = global_batch_order(
            len(train_examples), global_batch, train_cfg["seed"], state["epoch"]
        )
        for batch_index in range(state["batch_in_epoch"], len(order)):
            loss_sum, flops = 0.0, 0.0
            for indices in micro_batches(order[batch_index], world, rank, train_cfg["grad_accum"]):
                batch = collate([train_examples[i] for i in indices], data_cfg["mode"], device)
                out = engine(**batch)
                engine.backward(out.loss)
                engine.step()
                loss_sum += out.loss.item()
                flops += train_flops(config, batch["lengths"].tolist(), matmul_params)
            # One all-reduce for both: the mean loss and the FLOPs of every rank's users.
            totals = torch.tensor(
                [loss_sum / train_cfg["grad_accum"], flops], dtype=torch.float64, device=device
            )
            dist.all_reduce(totals)
            state["step"] += 1
            state["batch_in_epoch"] = batch_index + 1
            window_samples += global_batch
            window_flops += totals[1].item()
            step = state["step"]
            record = {
                "loss": totals[0].item() / world,
                "lr": scheduler.get_last_lr()[0] if scheduler else train_cfg["lr"],
            }
            if step % train_cfg["log_every"] == 0 or step == 1:
                seconds = time.perf_counter() - window_start
                record["samples_per_s"] = window_samples / seconds
                record.update(throughput_record(window_flops, seconds, world, peak))
                window_start, window_samples, window_flops = time.perf_counter(), 0, 0.0
                rate = (
                    f"mfu={record['mfu']:.1%}"
                    if "mfu" in record
                    else (f"tflops={record['tflops_per_device']:.3g}")
                )
                progress.set_postfix_str(
                    f"loss={record['loss']:.4f} samples/s={record['samples_per_s']:.1f} {rate}"
                )
            log.log(step, record)
            progress.update(1)
            paused = time.perf_counter()  # evaluation and checkpoints stay out of throughput

            if step % train_cfg["eval_every"] == 0 or step == total_steps:
                valid = evaluate(
                    engine,
                    valid_examples,
                    train_cfg["eval_batch_size"],
                    valid_seen,
                    device,
                )
                log.log(step, {f"valid/{k}": v for k, v in valid.items()})
                if valid["ndcg@10"] > state["best_ndcg"]:
                    state["best_ndcg"], state["bad_evals"] = valid["ndcg@10"], 0
                    checkpoint("best", save_latest=False)
                else:
                    state["bad_evals"] += 1
                    state["stopped"] = state["bad_evals"] >= train_cfg["patience"]
                if rank == 0:
                    progress.write(
                        f"step {step}: valid ndcg@10 {valid['ndcg@10']:.4f} hr@10 {valid['hr@10']:.4f}"
                    )
            if step % train_cfg["save_every"] == 0:
                checkpoint(f"step{step}")
            if train_cfg["kill_at_step"] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop_requested(output_dir, device):
                checkpoint(f"step{step}")
                if rank == 0:
                    print(f"stop requested: checkpointed step {step}, exiting to be requeued")
                progress.close()
                log.close()
                dist.destroy_process_group()
                return 0
            if step >= total_steps or state["stopped"]:
                break
            window_start += time.perf_counter() - paused
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    progress.close()

    # The best weights become the release: consolidated 16-bit, HF-style, loadable without DeepSpeed.
    if (checkpoints / "best").is_dir():
        # Optimizer states are loaded too although unused: DeepSpeed 0.19 ZeRO-3 without them
        # rebuilds the weights from the `latest` tag instead of the one asked for.
        engine.load_checkpoint(str(checkpoints), tag="best")
    test = evaluate(engine, test_split[0], train_cfg["eval_batch_size"], test_split[1], device)
    save_release(engine, cfg, config, splits, stats, state, test, test_split, log)
    log.close()
    dist.barrier()
    dist.destroy_process_group()  # a process group left to interpreter exit can abort the process
    return 0


if __name__ == "__main__":
    run_and_exit(main)
