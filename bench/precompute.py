"""Precompute overhead and storage, measured in one run.

    python bench/precompute.py                      # CPU, 100k-item catalogue, K=50
    python bench/precompute.py --device cuda --hidden 4096 --layers 32 --batch-size 64

Three passes over the same batches of one teacher:
1. bare forward: the backbone and the user representations (no catalogue scoring);
2. scored forward: plus one full-catalogue scoring (what any teacher inference pays);
3. precompute: `trainer/precompute.py`'s per-batch path (chunked top-K, log-sum-exp, hidden
   states, packing) with the background shard writer writing real tar shards.
It prints examples/s of each, precompute / bare and precompute / scored, and the shards' bytes
per position against storing the full float32 logits (N x 4 bytes). Results go to
bench/results/precompute.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recdistill.models.teacher import LLMRecTeacher, TeacherConfig
from recdistill.trainer.data.batches import pad_right
from recdistill.trainer.data.shards import ShardSink, verify_group
from recdistill.trainer.data.teacher_outputs import batch_samples

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=100_000, help="catalogue size (default 100k)")
    parser.add_argument("--users", type=int, default=512, help="examples (user sequences) per pass")
    parser.add_argument("--seq-len", type=int, default=50, help="items per sequence (default 50)")
    parser.add_argument("--hidden", type=int, default=256, help="teacher hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="teacher layers (default 4)")
    parser.add_argument("--topk", type=int, default=50, help="K (default 50)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="examples per forward (default 32)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="float32", help="teacher dtype (default float32)")
    parser.add_argument(
        "--results", default=str(ROOT / "bench/results/precompute.json"), help="JSON results file"
    )
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    backbone = {
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": 32,
        "max_position_embeddings": 2 * args.seq_len,
    }
    teacher = (
        LLMRecTeacher(
            TeacherConfig(
                num_items=args.items, backbone=backbone, item_dim=64, score_chunk_size=16384
            )
        )
        .to(device=device, dtype=dtype)
        .eval()
    )
    rng = np.random.default_rng(0)
    examples = []
    for row in range(args.users):
        seq = rng.integers(1, args.items + 1, size=args.seq_len + 1).tolist()
        examples.append((f"u{row:09d}", row, seq[:-1], seq[1:]))
    batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    cfg = {
        "data": {"mode": "sequence"},
        "topk": args.topk,
        "temperatures": [1.0],
        "hidden_layers": [args.layers],
        "hidden_positions": [-1],
        "hidden_dtype": "float16",
    }

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare(batch, score: bool):
        ids, lengths = pad_right([e[2] for e in batch])
        ids, lengths = ids.to(device), lengths.to(device)
        with torch.no_grad():
            out = teacher(ids, lengths)
            if score:  # one full-catalogue scoring of every position, as any inference does
                reps = out.user_reps.reshape(-1, out.user_reps.shape[-1])
                for start in range(0, reps.shape[0], 256):
                    (reps[start : start + 256].float() @ teacher.item_table().float().T).max(dim=1)

    def timed(fn) -> float:
        fn(batches[0])  # warm-up
        sync()
        started = time.perf_counter()
        for batch in batches:
            fn(batch)
        sync()
        return len(examples) / (time.perf_counter() - started)

    bare_rate = timed(lambda b: bare(b, score=False))
    scored_rate = timed(lambda b: bare(b, score=True))
    with tempfile.TemporaryDirectory() as out:
        sink = ShardSink(Path(out), max_blocks=len(examples), max_bytes=10**10)
        batch_samples(teacher, args.items, batches[0], cfg, device)  # warm-up
        sync()
        started = time.perf_counter()
        sink.start_group(0)
        for batch in batches:
            for key, arrays in batch_samples(teacher, args.items, batch, cfg, device):
                sink.put(key, arrays)
        sink.end_group()
        sink.close()
        precompute_rate = len(examples) / (time.perf_counter() - started)
        record = verify_group(Path(out), 0, len(examples))
        shard_bytes = sum(s["bytes"] for s in record["shards"])
    positions = len(examples) * args.seq_len
    result = {
        "device": str(device),
        "dtype": args.dtype,
        "items": args.items,
        "topk": args.topk,
        "hidden": args.hidden,
        "layers": args.layers,
        "seq_len": args.seq_len,
        "examples": len(examples),
        "batch_size": args.batch_size,
        "bare_forward_examples_per_s": round(bare_rate, 1),
        "scored_forward_examples_per_s": round(scored_rate, 1),
        "precompute_examples_per_s": round(precompute_rate, 1),
        "precompute_vs_bare_forward": round(precompute_rate / bare_rate, 3),
        "precompute_vs_scored_forward": round(precompute_rate / scored_rate, 3),
        "bytes_per_position": round(shard_bytes / positions, 1),
        "full_float32_logits_bytes_per_position": 4 * args.items,
        "bytes_vs_full_logits": round(shard_bytes / positions / (4 * args.items), 5),
    }
    print(json.dumps(result, indent=2))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
