"""Run the fine-tuned teacher once over the training data; write its outputs as webdataset shards.

    deepspeed --num_gpus 8 trainer/precompute.py --config configs/precompute_demo.yaml [key=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 trainer/precompute.py --config configs/precompute_demo.yaml

Per sample: input item ids, targets, the teacher's top-K ids and scores (float16), log-sum-exp
over the whole catalogue per temperature (the candidates' confidence, -log p, is derived from it
and the scores when read), log p of the true next item, and hidden states of the configured layers
at the configured positions (float16 / bfloat16 / int8 with a per-row scale). Item ids are stored
as uint16 when the catalogue has fewer than 65,536 items, else int32. Samples are stored in
columnar blocks of `block_size` (trainer/data/shards.py, format 2), optionally zstd-compressed.
Once per run: the teacher's item table and manifest.json.

Examples are planned in groups (one shard file each unless it passes `shard_max_bytes`) of
`shard_size` examples, or of about `shard_size` bytes ("10MB", the default: the loader's per-shard
cost then weighs little against the shard's bytes), independent of the number of ranks; rank r
writes groups r, r + world, ... A rerun skips groups whose shards match their record and redoes
the rest, so any kill and rerun ends with exactly the samples of an uninterrupted run.

Inference: `data_parallel` (default) runs one full copy of the teacher per rank; `zero3` shards
a teacher too large for one device across ranks with DeepSpeed ZeRO-3, every rank running the
same number of forward passes (ranks with fewer batches run padding passes: ZeRO-3 gathers
parameters collectively, so unequal counts deadlock).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from recdistill.models.teacher import WEIGHTS_FILE, LLMRecTeacher, load_teacher_config
from recdistill.trainer.config import (
    ConfigError,
    checked_config,
    parse_job_args,
    save_config,
)
from recdistill.trainer.data.pipeline import load_sequences
from recdistill.trainer.data.shards import (
    COMPRESSIONS,
    FORMAT,
    ITEM_TABLE_FILE,
    MANIFEST,
    ShardSink,
    discard_group,
    id_dtype,
    sha256_file,
    verify_group,
    write_json_atomic,
)
from recdistill.trainer.data.teacher_outputs import (
    batch_samples,
    group_size,
    plan_examples,
    temperatures_of,
)
from recdistill.trainer.deepspeed_host import init_distributed, local_world_size
from recdistill.trainer.defaults import PRECOMPUTE as DEFAULTS
from recdistill.trainer.errors import JobError
from recdistill.trainer.inputs import (
    choice,
    data_stats,
    existing_dir,
    existing_file,
    required,
    size_in_bytes,
)
from recdistill.trainer.requeue import STOP_FILE
from recdistill.trainer.shutdown import run_and_exit


def parse_args(argv=None):
    return parse_job_args(
        __doc__, "precompute", "topk=100 batch_size=256", argv, resume=False, deepspeed=True
    )


def check_inputs(cfg: dict) -> str:
    """Everything that can be wrong before a rank starts; a one-line summary when all is well."""
    choice(cfg, "inference", ["data_parallel", "zero3"])
    choice(cfg, "compression", list(COMPRESSIONS))
    choice(cfg, "hidden_dtype", ["float16", "bfloat16", "int8"])
    choice(cfg, "dtype", ["float32", "bfloat16", "float16"])
    teacher_dir = existing_dir(required(cfg, "teacher"), "teacher")
    existing_file(teacher_dir / "teacher_config.json", "teacher")
    existing_file(teacher_dir / WEIGHTS_FILE, "teacher")
    if cfg["inference"] == "zero3":
        existing_file(cfg["deepspeed_config"], "deepspeed_config")
    out_dir = Path(required(cfg, "output_dir"))
    stats = data_stats(required(cfg, "data.dir"))
    model_config = load_teacher_config(teacher_dir)
    metrics_path = teacher_dir / "metrics.json"
    trained_on = (
        json.loads(metrics_path.read_text()).get("item_vocab_sha256")
        if metrics_path.is_file()
        else None
    )
    if trained_on not in (None, stats["item_vocab_sha256"]):
        raise JobError(
            f"teacher {teacher_dir} was trained on another item vocabulary than data.dir {cfg['data']['dir']}"
        )
    if model_config.mode != cfg["data"]["mode"]:
        raise ConfigError(
            f"data.mode {cfg['data']['mode']!r}: teacher {teacher_dir} was trained in {model_config.mode} mode"
        )
    if isinstance(cfg["shard_size"], str):
        size_in_bytes(cfg["shard_size"], "shard_size")
    elif not is_count(cfg["shard_size"]):
        raise ConfigError(
            f"shard_size {cfg['shard_size']!r}: a count of examples (1000) or a size (10MB)"
        )
    if not is_count(cfg["min_shards"]):
        raise ConfigError(f"min_shards {cfg['min_shards']!r}: a count of at least 1")
    refuse_other_format(out_dir)
    return f"teacher {teacher_dir} ({model_config.mode} mode) over {cfg['data']['dir']} ({stats['items']} items) -> {out_dir}"


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# ---- examples ------------------------------------------------------------------------------


# ---- the teacher ---------------------------------------------------------------------------


def load_teacher_data_parallel(path: Path, dtype: str, device) -> LLMRecTeacher:
    return LLMRecTeacher.from_pretrained(path).to(device=device, dtype=getattr(torch, dtype))


def load_teacher_zero3(path: Path, ds_config_path: str):
    """A ZeRO-3 partitioned teacher: built under zero.Init, each weight loaded on rank 0 and
    scattered, so no rank ever holds the whole model."""
    from transformers.integrations import HfDeepSpeedConfig

    from recdistill.models.teacher import import_backbone_modules

    config = load_teacher_config(path)
    ds_config = json.loads(Path(ds_config_path).read_text())
    ds_config.pop("optimizer", None)
    ds_config.pop("scheduler", None)
    ds_config["train_micro_batch_size_per_gpu"] = 1
    import_backbone_modules(config)
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LLMRecTeacher(config, load_backbone_weights=False)
    rank = dist.get_rank()
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as weights:
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    param.data.copy_(weights.get_tensor(name))
    engine = deepspeed.initialize(model=model, config=ds_config)[0]
    engine.eval()
    return engine


# ---- samples -------------------------------------------------------------------------------


def block_size_of(cfg: dict, group: int) -> int:
    """Samples per block: `block_size`, or by default the whole group (one block per file)."""
    return cfg["block_size"] or group


def teacher_id(teacher_dir: Path) -> dict:
    config_bytes = (teacher_dir / "teacher_config.json").read_bytes()
    return {
        "path": str(teacher_dir.resolve()),
        "weights_sha256": sha256_file(teacher_dir / WEIGHTS_FILE),
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
    }


def samples_record(cfg: dict, size: int, teacher: dict, stats: dict) -> dict:
    """What fixes the samples of a group: the teacher's weights and config, the prepared data
    (its stats.json, timings aside) and every setting that changes what is stored. Each group
    record carries it; a rerun keeps finished groups only when it is the same."""
    prepared = {key: value for key, value in stats.items() if key != "seconds"}
    return {
        "teacher_weights_sha256": teacher["weights_sha256"],
        "teacher_config_sha256": teacher["config_sha256"],
        "data_stats_sha256": hashlib.sha256(
            json.dumps(prepared, sort_keys=True).encode()
        ).hexdigest(),
        "data": {key: cfg["data"][key] for key in ("mode", "prefixes", "max_len")},
        "topk": cfg["topk"],
        "temperatures": list(temperatures_of(cfg)),
        "hidden_layers": list(cfg["hidden_layers"]),
        "hidden_positions": list(cfg["hidden_positions"]),
        "hidden_dtype": cfg["hidden_dtype"],
        "inference": cfg["inference"],
        "dtype": cfg["dtype"],
        "examples_per_group": size,
        "block_size": block_size_of(cfg, size),
        "compression": cfg["compression"],
    }


def group_records(out_dir: Path) -> Iterator[tuple[Path, dict]]:
    """(path, record) of each finished group's record in output_dir; a torn record (debris of a
    kill, its group redone) is passed over."""
    for record_path in sorted(out_dir.glob("group-*.json")):
        try:
            yield record_path, json.loads(record_path.read_text())
        except json.JSONDecodeError:
            continue


def refuse_other_samples(out_dir: Path, samples: dict) -> None:
    """Finished groups of another teacher, data or setting in output_dir are neither kept as this
    run's (the manifest would describe samples they do not hold) nor deleted: the job stops and
    names them."""
    for record_path, record in group_records(out_dir):
        found = record.get("samples")
        if found == samples:
            continue
        if found is None:
            why = "it does not say which teacher and settings wrote them (an earlier version did)"
        else:
            why = "written with another " + ", ".join(
                key for key in samples if found.get(key) != samples[key]
            )
        raise JobError(
            f"{record_path}: {why}; choose another output_dir, or delete its shards and group "
            "records to write them again"
        )


def save_item_table(teacher, path: Path) -> None:
    module = getattr(teacher, "module", teacher)
    weight = module.item_embeddings.weight
    with deepspeed.zero.GatheredParameters([weight]) if hasattr(weight, "ds_id") else nullcontext():
        table = weight.detach().float().cpu().clone()
    if dist.get_rank() == 0:
        save_file({"weight": table}, str(path))


# ---- the job -------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = checked_config(args, DEFAULTS, check_inputs)
    if cfg is None:  # --check
        return 0
    teacher_dir, out_dir = Path(cfg["teacher"]), Path(cfg["output_dir"])

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        deepspeed.get_accelerator().device_name(), int(os.environ.get("LOCAL_RANK", 0))
    )
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))
    else:
        deepspeed.get_accelerator().set_device(device.index)

    model_config = load_teacher_config(teacher_dir)
    splits, stats = load_sequences(cfg["data"]["dir"])
    examples = plan_examples(splits["train"]["items"], cfg["data"])
    size = group_size(cfg, examples, model_config.num_items, model_config.hidden_size)
    groups = [(g, examples[g * size : (g + 1) * size]) for g in range(-(-len(examples) // size))]
    mine = [(g, members) for g, members in groups if g % world == rank]
    identity = [teacher_id(teacher_dir) if rank == 0 else None]  # hashes the weights: once
    dist.broadcast_object_list(identity, src=0)
    samples = samples_record(cfg, size, identity[0], stats)
    refuse_other_samples(out_dir, samples)  # every rank reads the same records: the same error

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)  # rewritten at the end, over every group
        for scratch in out_dir.glob("*.tmp"):
            scratch.unlink()
    dist.barrier()

    if cfg["inference"] == "zero3":
        teacher = load_teacher_zero3(teacher_dir, cfg["deepspeed_config"])
    else:
        teacher = load_teacher_data_parallel(teacher_dir, cfg["dtype"], device)

    todo = []
    for group, members in mine:
        if verify_group(out_dir, group, len(members)) is None:
            discard_group(out_dir, group)
            todo.append((group, members))
    batches_todo = sum(-(-len(m) // cfg["batch_size"]) for _, m in todo)
    if rank == 0 or todo:
        print(
            f"rank {rank}: {len(mine) - len(todo)} of {len(mine)} groups already done, {len(todo)} to write"
        )

    if rank == 0:
        print(
            f"{len(examples)} examples in {len(groups)} groups of {size} (shard_size {cfg['shard_size']})"
        )
    block_size = block_size_of(cfg, size)
    sink = ShardSink(
        out_dir,
        max_blocks=-(-size // block_size),
        max_bytes=cfg["shard_max_bytes"],
        block_size=block_size,
        compression=cfg["compression"],
        samples=samples,
    )
    progress = tqdm(
        total=sum(len(m) for _, m in todo), desc=f"precompute rank {rank}", unit="ex", position=rank
    )
    started, forwards = time.perf_counter(), 0
    stop_file = out_dir / STOP_FILE
    for group, members in todo:
        # Data-parallel ranks are independent: each stops between groups once the sbatch script's
        # USR1 trap has asked for it (ZeRO-3 ranks must run equal forwards, so they go on).
        if cfg["inference"] == "data_parallel" and stop_file.exists():
            break
        sink.start_group(group)
        for start in range(0, len(members), cfg["batch_size"]):
            batch = members[start : start + cfg["batch_size"]]
            for key, arrays in batch_samples(teacher, model_config.num_items, batch, cfg, device):
                sink.put(key, arrays)
            forwards += 1
            progress.update(len(batch))
            if cfg["kill_after_batches"] == forwards and rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            elapsed = time.perf_counter() - started
            progress.set_postfix(
                ex_s=f"{progress.n / elapsed:.1f}", MB=f"{sink.bytes_written / 1e6:.1f}"
            )
        sink.end_group()
    if cfg["inference"] == "zero3":
        # Every rank must run as many ZeRO-3 forwards as the busiest one.
        most = torch.tensor([batches_todo], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        for _ in range(int(most) - forwards):
            batch_samples(teacher, model_config.num_items, examples[:1], cfg, device)
    sink.close()
    progress.close()

    save_item_table(teacher, out_dir / ITEM_TABLE_FILE)
    dist.barrier()
    if rank == 0 and stop_file.exists():
        print("stop requested: finished groups are kept; rerun to complete the shards")
    elif rank == 0:
        write_manifest(out_dir, cfg, size, groups, stats, model_config, identity[0])
    dist.barrier()
    dist.destroy_process_group()  # a process group left to interpreter exit can abort the process
    return 0


def refuse_other_format(out_dir: Path) -> None:
    """Shards of another format version in output_dir are never deleted to make room."""
    for record_path, record in group_records(out_dir):
        found = record.get("format")
        if found != FORMAT:
            raise SystemExit(
                f"{record_path}: output_dir holds shards of format {found or 'recdistill-teacher-shards/1'}; "
                "convert them (trainer/convert_shards.py) or choose another output_dir"
            )


def write_manifest(
    out_dir: Path, cfg: dict, size: int, groups: list, stats: dict, model_config, teacher: dict
) -> None:
    records = []
    for group, members in groups:
        record = verify_group(out_dir, group, len(members))
        if record is None:
            raise SystemExit(f"{out_dir}: group {group} is incomplete after the run")
        records.append({**record, "examples": len(members)})
    shards = [shard for record in records for shard in record["shards"]]
    manifest = {
        "format": FORMAT,
        "mode": cfg["data"]["mode"],
        "teacher": teacher,
        "item_vocab_sha256": stats["item_vocab_sha256"],
        "num_items": model_config.num_items,
        "item_table": ITEM_TABLE_FILE,
        "item_dim": model_config.item_dim,
        "hidden_size": model_config.hidden_size,
        "teacher_layers": model_config.num_layers,
        "topk": min(cfg["topk"], model_config.num_items),
        "temperatures": list(temperatures_of(cfg)),
        "hidden_layers": list(cfg["hidden_layers"]),
        "hidden_positions": list(cfg["hidden_positions"])
        if cfg["data"]["mode"] == "sequence"
        else ["last"],
        "block_size": block_size_of(cfg, size),
        "compression": cfg["compression"],
        "dtypes": {
            "item_ids": str(id_dtype(model_config.num_items)),
            "topk_ids": str(id_dtype(model_config.num_items)),
            "topk_scores": "float16",
            "logsumexp": "float32",
            "target_logprob": "float32",
            "hidden": cfg["hidden_dtype"],
        },
        "max_len": cfg["data"]["max_len"],
        "data_dir": str(Path(cfg["data"]["dir"]).resolve()),
        "examples": sum(len(m) for _, m in groups),
        "positions": sum(len(e[3]) for _, m in groups for e in m),
        "examples_per_group": size,
        "bytes": sum(shard["bytes"] for shard in shards),
        "shards": shards,
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    save_config(cfg, out_dir / "precompute_config.yaml")
    print(
        json.dumps(
            {
                "examples": manifest["examples"],
                "positions": manifest["positions"],
                "shards": len(shards),
                "bytes": manifest["bytes"],
            }
        )
    )


if __name__ == "__main__":
    run_and_exit(main)
