"""Every job's config keys with their defaults: a config file (YAML or JSON) is laid over these, and
a key that is not here is an error (trainer/config.py). docs/ documents each key; a test checks
that the docs and these dicts agree."""

from __future__ import annotations

from recdistill.models.distillation import LOSS_DEFAULTS

TEACHER: dict = {
    "data": {
        "dir": None,  # output of trainer/prepare_data.py
        "mode": "sequence",  # sequence | prefix
        "prefixes": "last:5",  # prefix mode: which history prefixes of each user train (all, last:N, window:S)
        "max_len": 50,  # most recent items fed to the model
        # other prepared folders whose users' whole sequences also train (items matched by raw
        # id, ones outside data.dir's vocabulary dropped); none of data.dir's users may be there
        "extra_dirs": [],
    },
    "model": {
        "backbone": {},  # HF config dict for a backbone built from scratch (tests, demo)
        "backbone_path": None,  # local HF checkpoint (e.g. a LLaMA-2-7B folder); wins over `backbone`
        "item_dim": 64,
        "item_init_std": None,  # item table N(0, this) at the start; null: N(0, item_dim^-0.5)
        "input_dropout": 0.0,  # dropout on the projected item embeddings (from-scratch backbones)
        "tied_projection_init": False,  # user_out_proj starts as item_in_proj transposed
        "item_embeddings": None,  # [N+1, item_dim] table: safetensors `weight` or a student release folder
        "freeze_item_embeddings": False,
        "item_features": None,  # trainer/item_features.py file: [N+1, F] features projected into the item table
        "lora": None,  # {r, alpha, dropout, target_modules}
        "gradient_checkpointing": False,
        "score_chunk_size": 8192,
        "prompt": {
            "tokenizer": None,
            "prefix": "",
            "suffix": "",
            "prefix_ids": [],
            "suffix_ids": [],
        },
    },
    "train": {
        "deepspeed_config": "ds_configs/zero3_bf16.json",
        "output_dir": None,
        "micro_batch_size": 16,
        "grad_accum": 1,
        "lr": 1e-4,
        "weight_decay": 0.0,
        "warmup_steps": 100,
        "epochs": 1,
        "max_steps": None,  # overrides epochs when set
        "seed": 0,
        "log_every": 10,
        "peak_tflops": None,  # per device, for MFU; null: the GPU's bf16/fp16 peak from a table
        "eval_every": 500,
        "eval_batch_size": 64,
        "eval_exclude_history": False,  # rank out every item of the user's whole history
        "save_every": 500,
        "patience": 5,  # evaluations without NDCG@10 improvement before stopping
        "kill_at_step": None,  # fault injection for tests: SIGKILL this process after that step
    },
}


PRECOMPUTE: dict = {
    "teacher": None,  # a teacher release folder (OUTPUT/final of trainer/teacher.py)
    "data": {"dir": None, "mode": "sequence", "prefixes": "all", "max_len": 50},
    "output_dir": None,
    "topk": 50,
    "temperatures": [1.0],
    "hidden_layers": [],  # teacher hidden_states indices (i = after block i) to store
    "hidden_positions": [
        -1
    ],  # sequence mode: positions (from the end) whose hidden states are stored
    "hidden_dtype": "float16",  # float16 | bfloat16 | int8
    "batch_size": 64,
    # examples per group (the unit of work and of resume; one shard file unless it passes
    # shard_max_bytes), or a size ("10MB"): as many examples as take that many bytes on average
    "shard_size": "10MB",
    "min_shards": 128,  # with a size: at least this many groups (small data: smaller shards)
    "shard_max_bytes": 256_000_000,  # a group's tar files roll over at this size
    # samples per columnar block (one tar entry, one checksum); null: the whole group, one block
    # per file, which the loader reads without a copy (several blocks are joined by a copy)
    "block_size": None,
    "compression": "none",  # none | zstd (per block)
    "inference": "data_parallel",  # data_parallel | zero3
    "dtype": "float32",  # data_parallel: float32 | bfloat16 | float16
    "deepspeed_config": "ds_configs/zero3_bf16.json",  # zero3 inference
    "kill_after_batches": None,  # fault injection for tests: SIGKILL rank 0 after that many batches
}


DISTILL: dict = {
    "data": {
        "dir": None,
        "max_len": 50,
    },  # the student's prepared data (validation, test, vocabulary)
    "shards": {
        "dir": None,  # trainer/precompute.py output
        "mode": "exact",  # exact (resumes mid-epoch exactly) | resampled (restart-safe, no data state)
        "workers": 2,  # DataLoader worker processes per rank (0: read in the training process)
        # groups of batches each worker prepares ahead (a group: ~8 MB of shard bytes, in /dev/shm)
        "prefetch": 4,
        "cache_mb": 512,  # decoded shards kept for later epochs, MB of shard bytes per worker
        "gather": "host",  # host (loader makes batches) | device (on the model's device; workers 0)
        # map shard files (mmap: the loader reads the page cache's pages, no copy); false copies
        # each file into memory (a shard file changed in place while mapped ends the job: SIGBUS)
        "map_files": True,
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
