"""Turning prepared sequences into padded tensors and deterministic, rank-aware batch orders."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_right(
    sequences: Sequence[Sequence[int]], length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] int64 ids right-padded with 0, and [B] lengths."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = length or max(1, int(lengths.max()) if len(sequences) else 1)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return ids, lengths


def sequence_batch(item_lists: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Sequence mode: every position predicts the next item (inputs items[:-1], targets items[1:])."""
    inputs, lengths = pad_right([seq[:-1] for seq in item_lists])
    targets, _ = pad_right([seq[1:] for seq in item_lists], length=inputs.shape[1])
    return {"item_ids": inputs, "lengths": lengths, "targets": targets}


def prefix_batch(
    histories: Sequence[Sequence[int]], targets: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Prefix mode and evaluation: one history and one next item per row."""
    ids, lengths = pad_right(histories)
    return {
        "item_ids": ids,
        "lengths": lengths,
        "targets": torch.tensor(list(targets), dtype=torch.long),
    }


def select_prefixes(length: int, spec: str, min_history: int = 1) -> list[int]:
    """Target positions t (history = items[:t], target = items[t]) chosen for one sequence.

    spec: "all" (every t >= min_history), "last:N" (the N latest), "window:S" (every S-th t,
    counting back from the latest, so the latest is always included).
    """
    candidates = list(range(min_history, length))
    if spec == "all":
        return candidates
    kind, _, value = spec.partition(":")
    if kind == "last" and value.isdigit():
        return candidates[-int(value) :] if int(value) else []
    if kind == "window" and value.isdigit() and int(value) > 0:
        return candidates[::-1][:: int(value)][::-1]
    raise ValueError(f"prefix selection {spec!r}: use 'all', 'last:N' or 'window:S'")


def global_batch_order(num_examples: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """[steps, global_batch] example indices for one epoch: a seeded shuffle, the incomplete last
    batch dropped, so every rank runs the same number of steps whatever the data."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    steps = num_examples // global_batch
    return order[: steps * global_batch].reshape(steps, global_batch)


def micro_batches(
    global_indices: np.ndarray, world_size: int, rank: int, grad_accum: int
) -> list[np.ndarray]:
    """This rank's `grad_accum` micro-batches of one global batch (equal sizes on every rank)."""
    chunks = np.array_split(global_indices, world_size * grad_accum)
    return [chunks[step * world_size + rank] for step in range(grad_accum)]


def even_shard(
    num_examples: int, world_size: int, rank: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation indices of this rank and their weights (0 for padding repeats), so that every
    rank runs the same number of batches: ZeRO-3 deadlocks when ranks' forward counts differ."""
    per_rank = -(-num_examples // world_size)
    per_rank = -(-per_rank // batch_size) * batch_size
    indices = np.arange(rank * per_rank, (rank + 1) * per_rank)
    weights = (indices < num_examples).astype(np.float64)
    return np.minimum(indices, max(num_examples - 1, 0)), weights
