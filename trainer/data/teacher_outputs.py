"""What precompute stores per example: the examples planned from the train split, their grouping
into shards, and one teacher forward turned into per-example arrays (top-K ids and scores,
log-sum-exp per temperature, log p of the target, hidden states of chosen layers). Shared by
trainer/precompute.py and bench/precompute.py."""

from __future__ import annotations

import numpy as np
import torch

from recdistill.trainer.data.batches import pad_right, select_prefixes
from recdistill.trainer.data.shards import id_dtype
from recdistill.trainer.inputs import size_in_bytes


def plan_examples(train_items: list, data_cfg: dict) -> list[tuple[str, int, list[int], list[int]]]:
    """(key, user row, input items, targets) in a fixed order that does not depend on ranks.

    Sequence mode: one example per user, every position a target. Prefix mode: one per chosen
    history prefix, with a single target.
    """
    max_len = data_cfg["max_len"]
    examples = []
    for row, items in enumerate(train_items):
        if len(items) < 2:
            continue
        if data_cfg["mode"] == "sequence":
            seq = items[-(max_len + 1) :]
            examples.append((f"u{row:09d}", row, seq[:-1], seq[1:]))
        else:
            for t in select_prefixes(len(items), data_cfg["prefixes"]):
                examples.append(
                    (f"u{row:09d}t{t:05d}", row, items[max(0, t - max_len) : t], [items[t]])
                )
    return examples


def pack_hidden(hidden: torch.Tensor, dtype: str) -> dict[str, np.ndarray]:
    """[P, H] hidden states in the stored dtype (bfloat16 travels as its uint16 bits)."""
    if dtype == "float16":
        return {"": hidden.to(torch.float16).cpu().numpy()}
    if dtype == "bfloat16":
        return {"": hidden.to(torch.bfloat16).view(torch.uint16).cpu().numpy()}
    if dtype == "int8":
        scale = hidden.float().abs().amax(dim=-1).clamp(min=1e-12) / 127.0  # [P]
        quantized = torch.round(hidden.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"": quantized.cpu().numpy(), "_scale": scale.cpu().numpy().astype(np.float32)}
    raise ValueError(f"hidden_dtype {dtype!r}: use float16, bfloat16 or int8")


def temperatures_of(cfg: dict) -> tuple[float, ...]:
    """Temperature 1 first (confidence and log p use it), then the others the config lists."""
    return (1.0, *[float(t) for t in cfg["temperatures"] if float(t) != 1.0])


def hidden_positions(length: int, wanted: list[int]) -> list[int]:
    """Sequence mode: the configured positions (negative = from the end) inside a sequence."""
    return sorted({min(max(length + p if p < 0 else p, 0), length - 1) for p in wanted})


HIDDEN_BYTES = {"float16": 2, "bfloat16": 2, "int8": 1}  # per hidden unit, as stored


def example_bytes(example: tuple, cfg: dict, num_items: int, hidden_size: int) -> int:
    """The bytes of a planned example's arrays as `batch_samples` stores them (a block's headers
    aside), known before the teacher runs: what sizes groups by bytes (precompute's shard_size)."""
    _, _, items, targets = example
    id_bytes = id_dtype(num_items).itemsize
    topk = min(cfg["topk"], num_items)
    # per target: its id, top-K ids and float16 scores, float32 log-sum-exp per temperature and
    # log p of the target
    per_target = id_bytes + topk * (id_bytes + 2) + 4 * len(temperatures_of(cfg)) + 4
    size = len(items) * id_bytes + len(targets) * per_target + 8  # + user_row (int64)
    row_groups = 3  # an int32 count per sample for items, targets and the per-sample fields
    if cfg["hidden_layers"]:
        sequence_mode = cfg["data"]["mode"] == "sequence"
        rows = len(hidden_positions(len(items), cfg["hidden_positions"])) if sequence_mode else 1
        per_row = HIDDEN_BYTES[cfg["hidden_dtype"]] * hidden_size
        per_row += 4 if cfg["hidden_dtype"] == "int8" else 0  # its float32 scale
        size += rows * (4 + len(cfg["hidden_layers"]) * per_row)  # + hidden_positions (int32)
        row_groups += 1
    return size + 4 * row_groups


def group_size(cfg: dict, examples: list, num_items: int, hidden_size: int) -> int:
    """Examples per group (and so per shard file): `shard_size` when it is a count; when it is a
    size ("10MB"), as many examples as take that many bytes on average, but few enough to make at
    least `min_shards` groups: a small data set still gives every reader of a distillation job
    shards (its shards are then smaller, and mostly held in the loader's shard cache,
    `shards.cache_mb`, after the first epoch)."""
    size = cfg["shard_size"]
    if not isinstance(size, str):
        return size
    if not examples:
        return 1
    sample = examples[:: max(1, len(examples) // 100_000)]  # a spread sample gives the mean
    mean = sum(example_bytes(e, cfg, num_items, hidden_size) for e in sample) / len(sample)
    by_bytes = round(size_in_bytes(size, "shard_size") / mean)
    return max(1, min(by_bytes, len(examples) // cfg["min_shards"]))


def batch_samples(
    teacher, num_items: int, examples: list, cfg: dict, device
) -> list[tuple[str, dict]]:
    """One teacher forward for a batch of examples; returns (key, arrays) per example."""

    sequence_mode = cfg["data"]["mode"] == "sequence"
    inputs, lengths = pad_right([e[2] for e in examples])
    if sequence_mode:
        targets, _ = pad_right([e[3] for e in examples], length=inputs.shape[1])
    else:
        targets = torch.tensor([e[3][0] for e in examples])
    inputs, lengths, targets = inputs.to(device), lengths.to(device), targets.to(device)
    with torch.no_grad():
        out = teacher(
            inputs,
            lengths,
            targets=targets,
            hidden_layers=tuple(cfg["hidden_layers"]),
            topk=min(cfg["topk"], num_items),
            temperatures=temperatures_of(cfg),
            score="all",
            rank_targets=False,  # the samples store log p of the target, not its rank
        )
    stats = out.stats  # rows: every real position, user by user
    ids = id_dtype(num_items)
    target_logprob = stats.target_scores - stats.logsumexp[:, 0]
    # The last real position of each row in the backbone's input (prefix mode: after the prompt).
    last = getattr(teacher, "module", teacher).last_positions(lengths)
    samples, offset = [], 0
    for row, (key, user_row, item_ids, example_targets) in enumerate(examples):
        rows = slice(offset, offset + len(example_targets))
        offset += len(example_targets)
        arrays = {
            "item_ids": np.asarray(item_ids, dtype=ids),
            "targets": np.asarray(example_targets, dtype=ids),
            "topk_ids": stats.topk_ids[rows].to(torch.int32).cpu().numpy().astype(ids),
            "topk_scores": stats.topk_scores[rows].to(torch.float16).cpu().numpy(),
            "logsumexp": stats.logsumexp[rows].float().cpu().numpy(),
            "target_logprob": target_logprob[rows].float().cpu().numpy(),
        }
        if cfg["hidden_layers"]:
            if sequence_mode:
                positions = hidden_positions(len(item_ids), cfg["hidden_positions"])
            else:
                positions = [int(last[row])]
            arrays["hidden_positions"] = np.asarray(positions, dtype=np.int32)
            for layer in cfg["hidden_layers"]:
                packed = pack_hidden(out.hidden_states[layer][row, positions], cfg["hidden_dtype"])
                arrays.update(
                    {f"hidden_{layer}{suffix}": value for suffix, value in packed.items()}
                )
        arrays["user_row"] = np.asarray([user_row], dtype=np.int64)  # row of the train split
        samples.append((key, arrays))

    return samples
