"""Streaming teacher shards into student batches: webdataset readers, split by rank and worker.

The loader is NOT passed through `accelerator.prepare()` (that would re-split the stream or
funnel it through rank 0): each rank reads only its own shards, and each DataLoader worker only
its part of those.

A shard is read whole (one tar of columnar blocks, trainer/data/shards.py) into `ShardColumns`;
a batch is then one vectorised gather of its samples' rows (`gather`, `to_batches`; several
batches at once), never a Python loop over samples or positions. Batches carry the teacher's
outputs only for the positions that have a target, flat over the batch ([M, ...],
`target_positions` says where each sits in [B * L]), so nothing is padded that the losses would
mask out again.

With gather="device" (shards.gather) the loader makes no batch: it yields GatherPlans (the decoded
shards and each group's sample indices) and `iter_batches` assembles them on the training device
(`DeviceGather`, torch, the same tensors), so the host only reads and checks shards.

Two modes:
- "exact": every epoch shuffles the shard order (seeded by epoch), deals shards to ranks and
  workers, and shuffles samples within each shard (seeded by epoch and shard; the shard is the
  shuffle buffer). Every worker yields the same number of batches, so every rank runs the same
  number of steps whatever the shard sizes; a worker hands its batches over in groups (of
  `group_batches`, the last of an epoch smaller), taken from workers 0..W-1 in turn. The
  position in an epoch is therefore one number, the batches consumed; it maps to (shard,
  offset) per worker from the manifest's counts, which is how a resumed job continues exactly.
  The stream runs on from epoch to epoch by itself, so workers start once per job (persistent).
- "resampled": every worker draws shards with replacement forever (webdataset's
  ResampledShards) through a sample shuffle buffer; an epoch is a nominal number of steps.
  Restart-safe with no data state at all, but a resumed job sees a different stream.

Damaged shards raise ShardError naming the shard (on_error="raise"), or are skipped whole and
reported by a marker item `{"skipped_shards": [reason]}` in the stream, which the job counts and
logs. A worker that skipped a shard still makes its planned number of batches, from its other
shards read again, so every rank keeps the same step count without asking the others (a skipped
shard changes the data, so such an epoch no longer resumes exactly).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recdistill.trainer.data.shards import ReadBuffers, ShardError, read_blocks, row_group

log = logging.getLogger(__name__)

# Batches are gathered and split several at once, about this many shard bytes together (at most
# 16 batches): one set of numpy calls for several small batches, whose per-call overhead costs
# more than their bytes; large batches go one at a time (bigger gathers fall out of the CPU cache).
GATHER_BYTES = 2_000_000
# A loader worker hands over its batches in groups of about this many shard bytes (at most 64
# batches, at least one gather), one item each (PackedBatches): an item costs the training thread
# about 0.45 ms whatever its size, which a group shares among its batches. In the training process
# (no workers) a group is one gather.
HANDOVER_BYTES = 8_000_000
# shards whose sample orders are drawn at once (TeacherShardStream._sample_orders)
SAMPLE_ORDERS_AHEAD = 16


def plan_epoch(
    shards: list[dict], epoch: int, seed: int, world: int, workers: int
) -> list[list[list[dict]]]:
    """plan[rank][worker] = that worker's shards for this epoch, in reading order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    plan = [[[] for _ in range(workers)] for _ in range(world)]
    for position, index in enumerate(order):
        plan[position % world][(position // world) % workers].append(shards[index])
    return plan


def batches_per_worker(plan: list[list[list[dict]]], batch_size: int) -> int:
    """The fewest full batches any worker of any rank can make: all of them make exactly this many."""
    return min(
        sum(s["count"] for s in worker_shards) // batch_size
        for rank in plan
        for worker_shards in rank
    )


# ---- columns and batches -----------------------------------------------------------------------


def ragged_rows(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat row indices of samples whose rows are [starts[i], starts[i] + counts[i])."""
    before = np.cumsum(counts) - counts  # each sample's first slot in the output
    return np.repeat(starts - before, counts) + np.arange(int(counts.sum()))


def ragged_coords(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sample, index within the sample) of every row of ragged samples with these counts."""
    rows = np.repeat(np.arange(len(counts)), counts)
    return rows, np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)


class ShardColumns:
    """One shard's samples as concatenated columns: every field one array, rows of sample i of a
    row group at starts[group][i] .. + counts[group][i]."""

    def __init__(self, blocks: list):
        fields = [key for key in blocks[0].arrays if not key.startswith("counts_")]
        # one block (precompute's default): the zero-copy views of the blob; several blocks are
        # joined by a copy into new memory (3 blocks: 2/3 the rate of 1, docs/benchmarks.md)
        join = (lambda parts: parts[0]) if len(blocks) == 1 else np.concatenate
        self.fields = {key: join([b.arrays[key] for b in blocks]) for key in fields}
        self.counts = {
            key.removeprefix("counts_"): join([b.arrays[key] for b in blocks]).astype(np.int64)
            for key in blocks[0].arrays
            if key.startswith("counts_")
        }
        self.starts = {group: np.cumsum(c) - c for group, c in self.counts.items()}

    def __len__(self) -> int:
        return len(self.counts["items"])


def gather(parts: list[tuple[ShardColumns, np.ndarray]]) -> dict[str, np.ndarray]:
    """The chosen samples of one or more shards ((columns, sample indices) pairs) as one ragged
    set: fields plus `counts_GROUP`. Each field is gathered straight into its output, one copy of
    its bytes (a gather per shard and then a concatenation would copy a batch twice)."""
    groups = parts[0][0].counts
    out = {f"counts_{g}": np.concatenate([c.counts[g][i] for c, i in parts]) for g in groups}
    rows = {g: [ragged_rows(c.starts[g][i], c.counts[g][i]) for c, i in parts] for g in groups}
    for key, values in parts[0][0].fields.items():
        part_rows = rows[row_group(key)]
        field = np.empty((sum(len(r) for r in part_rows), *values.shape[1:]), values.dtype)
        at = 0
        for (columns, _), taken in zip(parts, part_rows):
            # mode="clip": "raise" buffers the output; the rows are in range by construction
            np.take(
                columns.fields[key], taken, axis=0, out=field[at : at + len(taken)], mode="clip"
            )
            at += len(taken)
        out[key] = field
    return out


def hidden_layers(fields) -> list[str]:
    """The stored hidden-state layers (hidden_L) among a shard's fields."""
    return [
        key
        for key in fields
        if key.startswith("hidden_") and not key.endswith("_scale") and key != "hidden_positions"
    ]


def hidden_tensor(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Hidden-state rows in their stored precision (float16, or bfloat16 from its 16 bits: uint16
    as stored, int16 as a device gathers them): `batch_to_device` widens them to float32 on the
    device, which halves what the loader writes and copies. int8 rows are scaled here (a per-row
    scale travels badly)."""
    if values.dtype in (torch.uint16, torch.int16):
        return values.view(torch.bfloat16)
    if values.dtype == torch.int8:
        return values.float() * scale[:, None]
    return values


def to_batch(ragged: dict[str, np.ndarray], mode: str) -> dict[str, torch.Tensor]:
    """Tensors of a batch of B samples (the ragged set of exactly B samples): `to_batches`."""
    return to_batches(ragged, len(ragged["counts_items"]), mode)[0]


def to_batches(
    ragged: dict[str, np.ndarray], batch_size: int, mode: str
) -> list[dict[str, torch.Tensor]]:
    """Tensors of the batches of `batch_size` consecutive samples of a ragged set (whose size is
    a multiple of it). The index arithmetic of all of them is done at once over the set, and each
    batch's tensors are views into the set's arrays: for small batches the count of numpy calls
    per batch, not the bytes, is what bounds a loader.

    Item ids travel as stored (uint16 for catalogues below 65,536 items, else int32), positions
    and lengths as int32, hidden states and top-K scores in their stored half precision: a
    quarter to half the bytes through worker IPC and host-to-device copies; `batch_to_device`
    widens every integer to int64 and every half to float32 on the device.
    Each batch: item_ids [B, L] (0-padded, L its longest sample) and lengths [B]; per target
    position, flat over the batch: target_positions [M] (index into B * L), targets [M],
    teacher_topk_ids [M, K], teacher_topk_scores [M, K], teacher_logsumexp [M, T],
    teacher_target_logprob [M]; with hidden states: hidden_positions / hidden_mask [B, P] and
    hidden_LAYER [B, P, H]. Targets sit at the last positions of each sample (sequence mode: all
    of them; prefix mode: the last item).
    """
    item_counts, target_counts = ragged["counts_items"], ragged["counts_targets"]
    n_batches = len(item_counts) // batch_size
    if n_batches * batch_size != len(item_counts):
        raise ValueError(f"{len(item_counts)} samples are not batches of {batch_size}")
    widths = item_counts.reshape(n_batches, batch_size).max(1)  # [n_batches]
    # batch b's padded [B, widths[b]] ids sit at item_starts[b] of one flat array
    item_starts = np.concatenate([[0], np.cumsum(widths * batch_size)])
    sample, col = ragged_coords(item_counts)  # of every item of the set
    batch_of, row = np.divmod(sample, batch_size)
    padded_ids = np.zeros(int(item_starts[-1]), dtype=ragged["item_ids"].dtype)
    padded_ids[item_starts[batch_of] + row * widths[batch_of] + col] = ragged["item_ids"]
    if np.array_equal(target_counts, item_counts):  # sequence mode: a target at every item
        target_positions = row * widths[batch_of] + col
    else:
        target_sample, index = ragged_coords(target_counts)
        target_batch, target_row = np.divmod(target_sample, batch_size)
        first_target = (item_counts - target_counts)[target_sample]
        target_positions = target_row * widths[target_batch] + first_target + index
    whole = {
        "item_ids": torch.from_numpy(padded_ids),
        "lengths": torch.from_numpy(item_counts.astype(np.int32)),
        "target_positions": torch.from_numpy(target_positions.astype(np.int32)),
        "targets": torch.from_numpy(ragged["targets"]),
        "teacher_topk_ids": torch.from_numpy(ragged["topk_ids"]),
        "teacher_topk_scores": torch.from_numpy(ragged["topk_scores"]),
        "teacher_logsumexp": torch.from_numpy(ragged["logsumexp"]),
        "teacher_target_logprob": torch.from_numpy(ragged["target_logprob"]),
    }
    # each group's row bounds at every batch boundary
    bounds = {
        group.removeprefix("counts_"): np.concatenate([[0], np.cumsum(counts)])[::batch_size]
        for group, counts in ragged.items()
        if group.startswith("counts_")
    }
    hidden = (
        hidden_batches(ragged, item_counts, mode, batch_size) if "counts_hidden" in ragged else None
    )
    batches = []
    for b in range(n_batches):
        samples = slice(b * batch_size, (b + 1) * batch_size)
        targets = slice(bounds["targets"][b], bounds["targets"][b + 1])
        batch = {
            "item_ids": whole["item_ids"][item_starts[b] : item_starts[b + 1]].view(
                batch_size, int(widths[b])
            ),
            "lengths": whole["lengths"][samples],
        }
        batch.update({key: whole[key][targets] for key in TARGET_FIELDS})
        if hidden is not None:
            batch.update(hidden(samples, slice(bounds["hidden"][b], bounds["hidden"][b + 1])))
        batches.append(batch)
    return batches


TARGET_FIELDS = (
    "target_positions",
    "targets",
    "teacher_topk_ids",
    "teacher_topk_scores",
    "teacher_logsumexp",
    "teacher_target_logprob",
)


def hidden_batches(
    ragged: dict[str, np.ndarray], item_counts: np.ndarray, mode: str, batch_size: int
):
    """hidden(samples, rows): for the batch of these samples and hidden rows of the set,
    hidden_positions / hidden_mask [B, P] and hidden_LAYER [B, P, H], P the most hidden positions
    any of its samples has (zero rows where a sample has fewer)."""
    hidden_counts = ragged["counts_hidden"]
    # prefix mode stores the backbone's last position (after the prompt): the student's matching
    # position is its last item.
    positions = (
        ragged["hidden_positions"]
        if mode == "sequence"
        else np.repeat(item_counts - 1, hidden_counts)
    ).astype(np.int32)
    scales = {key: torch.from_numpy(v) for key, v in ragged.items() if key.endswith("_scale")}
    layers = {
        key: hidden_tensor(torch.from_numpy(ragged[key]), scales.get(f"{key}_scale"))  # [rows, H]
        for key in hidden_layers(ragged)
    }
    slots = int(hidden_counts.max()) if len(hidden_counts) else 0
    if (hidden_counts == slots).all():  # every sample has P rows (the usual case): views only
        n_samples = len(hidden_counts)
        all_positions = torch.from_numpy(positions.reshape(n_samples, slots))
        all_layers = {
            key: values.view(n_samples, slots, values.shape[1]) for key, values in layers.items()
        }

        def even(samples: slice, rows: slice) -> dict[str, torch.Tensor]:
            out = {
                "hidden_positions": all_positions[samples],
                "hidden_mask": torch.ones((batch_size, slots), dtype=torch.bool),
            }
            out.update({key: values[samples] for key, values in all_layers.items()})
            return out

        return even

    def scattered(samples: slice, rows: slice) -> dict[str, torch.Tensor]:
        counts = hidden_counts[samples]
        width = int(counts.max())
        hidden_rows, slot = ragged_coords(counts)
        padded = np.zeros((batch_size, width), dtype=np.int32)
        padded[hidden_rows, slot] = positions[rows]
        mask = np.zeros((batch_size, width), dtype=bool)
        mask[hidden_rows, slot] = True
        out = {"hidden_positions": torch.from_numpy(padded), "hidden_mask": torch.from_numpy(mask)}
        at = (torch.from_numpy(hidden_rows), torch.from_numpy(slot))
        for key, values in layers.items():
            states = values.new_zeros((batch_size, width, values.shape[1]))
            states[at] = values[rows]
            out[key] = states
        return out

    return scattered


# ---- assembling batches where the model runs (shards.gather: device) ---------------------------

DEVICE_GATHER_WORKERS = (
    "shards.gather=device assembles batches in the training process from the shards it reads "
    "there: set shards.workers=0"
)


@dataclass
class GatherPlan:
    """A group of batches not yet assembled: (shard columns, sample indices) parts in batch
    order. With `shards.gather: device` the loader yields these and the training process
    assembles them on its device (`DeviceGather`), so the host only reads and checks shards."""

    parts: list[tuple[ShardColumns, np.ndarray]]
    batch_size: int
    mode: str


def _ragged_index(base: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
    """base[i] + j for j < counts[i], flat over i. `total` (= counts.sum()) comes from the host,
    so nothing waits for the device."""
    return torch.repeat_interleave(base, counts, output_size=total) + torch.arange(
        total, device=base.device
    )


class PlanLayout:
    """The host's part of assembling a GatherPlan: per-sample numbers only. For each row group,
    where each sample's rows start in its shard and, for the padded fields, where its slots start
    in the batches, each minus its first row in the gathered set, so that one repeat + arange on
    the device gives every row's index (`meta`); each batch's width and where its rows lie."""

    def __init__(self, plan: GatherPlan):
        parts, self.batch_size = plan.parts, plan.batch_size
        groups = [g for g in ("items", "targets", "hidden") if g in parts[0][0].counts]
        self.counts = {g: np.concatenate([c.counts[g][i] for c, i in parts]) for g in groups}
        self.totals = {g: int(self.counts[g].sum()) for g in groups}
        self.part_ends = {
            g: np.cumsum([int(c.counts[g][i].sum()) for c, i in parts]) for g in groups
        }
        self.n_batches = len(self.counts["items"]) // self.batch_size
        batch_of, row = np.divmod(np.arange(len(self.counts["items"])), self.batch_size)
        before = {g: np.cumsum(self.counts[g]) - self.counts[g] for g in groups}
        meta = {
            f"rows_{g}": np.concatenate([c.starts[g][i] for c, i in parts]) - before[g]
            for g in groups
        }
        meta.update({f"counts_{g}": self.counts[g] for g in groups})
        self.widths = self._per_batch_max("items")  # [n_batches]
        self.item_starts = np.concatenate([[0], np.cumsum(self.widths * self.batch_size)])
        pad_row = row * self.widths[batch_of]
        meta["pad_items"] = self.item_starts[batch_of] + pad_row - before["items"]
        first_target = self.counts["items"] - self.counts["targets"]
        meta["pad_targets"] = pad_row + first_target - before["targets"]
        if "hidden" in groups:
            self.slots = self._per_batch_max("hidden")
            self.hidden_starts = np.concatenate([[0], np.cumsum(self.slots * self.batch_size)])
            pad_hidden = self.hidden_starts[batch_of] + row * self.slots[batch_of]
            meta["pad_hidden"] = pad_hidden - before["hidden"]
            meta["last_item"] = self.counts["items"] - 1
        self.meta = {key: values.astype(np.int64) for key, values in meta.items()}
        self.target_bounds = np.concatenate([[0], np.cumsum(self.counts["targets"])])[
            :: self.batch_size
        ]

    def _per_batch_max(self, group: str) -> np.ndarray:
        return self.counts[group].reshape(self.n_batches, self.batch_size).max(1)

    def batch(self, b: int, whole: dict, hidden: dict) -> dict[str, torch.Tensor]:
        """Batch b of the plan as views of the plan's assembled tensors (`whole`: flat item ids,
        per-sample and per-target fields; `hidden`: flat padded hidden rows)."""
        size = self.batch_size
        targets = slice(int(self.target_bounds[b]), int(self.target_bounds[b + 1]))
        ids = whole["item_ids"][int(self.item_starts[b]) : int(self.item_starts[b + 1])]
        out = {
            "item_ids": ids.view(size, int(self.widths[b])),
            "lengths": whole["lengths"][b * size : (b + 1) * size],
        }
        out.update({key: whole[key][targets] for key in TARGET_FIELDS})
        rows = slice(int(self.hidden_starts[b]), int(self.hidden_starts[b + 1])) if hidden else None
        for key, values in hidden.items():
            out[key] = values[rows].view(size, int(self.slots[b]), *values.shape[1:])
        return out


class DeviceGather:
    """Turns GatherPlans into batches on one device: the same tensors, in the same dtypes, as
    `to_batches(gather(parts))` makes on the host. Each shard's columns are copied to the
    device once (one copy per field) and dropped when a plan no longer uses them; the host
    computes per-sample numbers only (offsets, widths), and every per-position index and copy
    runs on the device, with no device-to-host sync."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.held: dict[int, tuple[ShardColumns, dict[str, torch.Tensor]]] = {}

    def _copy_in(self, values: np.ndarray) -> torch.Tensor:
        """A host array on the device; on CUDA through pinned memory, so the copy runs behind the
        queued steps instead of waiting for them (torch's pinned-memory cache reuses buffers)."""
        # uint16 (ids, bfloat16 bits) travels as int16 bits: torch has few uint16 kernels
        tensor = torch.from_numpy(values.view(np.int16) if values.dtype == np.uint16 else values)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _sources(self, plan: GatherPlan) -> list[dict[str, torch.Tensor]]:
        wanted = {id(columns): columns for columns, _ in plan.parts}
        self.held = {key: held for key, held in self.held.items() if key in wanted}
        for key, columns in wanted.items():
            if key not in self.held:  # the columns are held too, so their id stays theirs
                moved = {name: self._copy_in(values) for name, values in columns.fields.items()}
                self.held[key] = (columns, moved)
        return [self.held[id(columns)][1] for columns, _ in plan.parts]

    def batches(self, plan: GatherPlan) -> list[dict[str, torch.Tensor]]:
        layout = PlanLayout(plan)
        sources, stored = self._sources(plan), plan.parts[0][0].fields
        meta = dict(zip(layout.meta, self._copy_in(np.stack(list(layout.meta.values())))))
        totals = layout.totals
        rows = {g: _ragged_index(meta[f"rows_{g}"], meta[f"counts_{g}"], totals[g]) for g in totals}

        def gathered(key: str) -> torch.Tensor:  # the rows of the plan's samples, as stored (bits)
            g = row_group(key)
            out = sources[0][key].new_empty((totals[g], *sources[0][key].shape[1:]))
            lo = 0
            for source, hi in zip(sources, layout.part_ends[g]):
                torch.index_select(source[key], 0, rows[g][lo:hi], out=out[lo:hi])
                lo = int(hi)
            return out

        def padded(values: torch.Tensor, g: str, size: int) -> torch.Tensor:
            out = values.new_zeros((size, *values.shape[1:]))
            out[_ragged_index(meta[f"pad_{g}"], meta[f"counts_{g}"], totals[g])] = values
            return out

        def as_stored(values: torch.Tensor, key: str) -> torch.Tensor:
            return values.view(torch.uint16) if stored[key].dtype == np.uint16 else values

        item_ids = padded(gathered("item_ids"), "items", int(layout.item_starts[-1]))
        whole = {
            "item_ids": as_stored(item_ids, "item_ids"),
            "lengths": meta["counts_items"].to(torch.int32),
            "target_positions": _ragged_index(
                meta["pad_targets"], meta["counts_targets"], totals["targets"]
            ).to(torch.int32),
            "targets": as_stored(gathered("targets"), "targets"),
            "teacher_topk_ids": as_stored(gathered("topk_ids"), "topk_ids"),
            "teacher_topk_scores": gathered("topk_scores"),
            "teacher_logsumexp": gathered("logsumexp"),
            "teacher_target_logprob": gathered("target_logprob"),
        }
        hidden = {}
        if "hidden" in totals:
            size = int(layout.hidden_starts[-1])
            hidden = self._hidden(plan, gathered, padded, meta, layout.counts["hidden"], size)
        return [layout.batch(b, whole, hidden) for b in range(layout.n_batches)]

    def _hidden(self, plan, gathered, padded, meta, hidden_counts, size) -> dict[str, torch.Tensor]:
        """hidden_positions, hidden_mask and hidden_LAYER of the plan as flat padded rows (each
        batch's [B, P_b] slots one after another), as `hidden_batches` makes them."""
        stored, total = plan.parts[0][0].fields, int(hidden_counts.sum())
        if plan.mode == "sequence":
            positions = gathered("hidden_positions").to(torch.int32)
        else:  # prefix mode: the student's matching position is its last item
            positions = torch.repeat_interleave(
                meta["last_item"], meta["counts_hidden"], output_size=total
            ).to(torch.int32)
        flat = {
            "hidden_positions": positions,
            "hidden_mask": torch.ones(total, dtype=torch.bool, device=self.device),
        }
        for key in hidden_layers(stored):
            scale = gathered(f"{key}_scale") if f"{key}_scale" in stored else None
            flat[key] = hidden_tensor(gathered(key), scale)
        if len(hidden_counts) and (hidden_counts == hidden_counts.max()).all():
            return flat  # every sample has P rows: the gathered rows are the padded layout
        return {key: padded(values, "hidden", size) for key, values in flat.items()}


# ---- moving batches: worker -> training process -> device -------------------------------------


@dataclass
class PackedBatches:
    """Batches as one uint8 buffer plus each batch's layout: a DataLoader worker hands the
    training process one shared-memory segment per group of batches instead of one per field
    or per batch. Each item a worker hands over costs the training process about 0.4-0.5 ms of
    its main thread (unpickling, receiving the segment's file descriptor, mapping it) whatever
    its size; a group of G batches costs that once."""

    buffer: torch.Tensor
    layouts: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]]

    def pin_memory(self) -> PackedBatches:  # what DataLoader(pin_memory=True) calls
        return PackedBatches(self.buffer.pin_memory(), self.layouts)


def pack_batches(batches: list[dict[str, torch.Tensor]]) -> PackedBatches:
    layouts, offset = [], 0
    for batch in batches:
        layout = []
        for name, tensor in batch.items():
            layout.append((name, tensor.dtype, tuple(tensor.shape), offset))
            offset += -(-tensor.numel() * tensor.element_size() // 8) * 8  # 8-byte aligned
        layouts.append(layout)
    # Allocated in shared memory and filled there: handing it over then copies nothing. Its size
    # is a multiple of 8, so it can be viewed as any dtype.
    buffer = torch.empty(offset, dtype=torch.uint8).share_memory_()
    for batch, layout in zip(batches, layouts):
        for (_, _, _, start), tensor in zip(layout, batch.values()):
            raw = tensor.contiguous().reshape(-1).view(torch.uint8)
            buffer[start : start + raw.numel()] = raw
    return PackedBatches(buffer, layouts)


def unpack_batches(packed: PackedBatches, device="cpu") -> list[dict[str, torch.Tensor]]:
    """Zero-copy views of the packed batches' fields (two view calls a field: the training
    thread pays for these), on `device`: the group's buffer is copied there whole, one copy
    (non-blocking from pinned memory on CUDA) instead of one per field and batch."""
    buffer = packed.buffer.to(device, non_blocking=True)
    typed: dict[torch.dtype, torch.Tensor] = {}  # the buffer as each dtype (fields 8-byte aligned)
    batches = []
    for layout in packed.layouts:
        batch = {}
        for name, dtype, shape, start in layout:
            if dtype not in typed:
                typed[dtype] = buffer.view(dtype)
            first = start // dtype.itemsize
            batch[name] = typed[dtype][first : first + math.prod(shape)].view(shape)
        batches.append(batch)
    return batches


def iter_batches(loader: Iterable, device="cpu"):
    """The loader's items as batch dicts, one at a time, or skip markers. A group that crossed
    from a worker is moved to `device` whole and unpacked there; GatherPlans are assembled there;
    batches made in process stay on the host (`batch_to_device` moves them)."""
    on_device = DeviceGather(device)
    for item in loader:
        if isinstance(item, GatherPlan):
            yield from on_device.batches(item)
        elif isinstance(item, PackedBatches):
            yield from unpack_batches(item, device)
        else:
            yield item


def batch_to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Copy to the device (asynchronously from pinned memory) and widen there: integers to
    int64, half-precision floats to float32."""
    moved = {}
    for name, tensor in batch.items():
        if tensor.dtype == torch.uint16:
            # uint16 has few kernels on some devices: travel as int16 bits, widen, unwrap the sign
            moved[name] = tensor.view(torch.int16).to(device, non_blocking=True).long() & 0xFFFF
            continue
        tensor = tensor.to(device, non_blocking=True)
        if tensor.dtype in (torch.int32, torch.int16, torch.uint8):
            tensor = tensor.long()
        elif tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        moved[name] = tensor
    return moved


# ---- the stream --------------------------------------------------------------------------------


class TeacherShardStream(IterableDataset):
    def __init__(
        self,
        shard_dir: str | Path,
        manifest: dict,
        rank: int,
        world: int,
        batch_size: int,
        workers: int,
        seed: int,
        mode: str = "exact",
        shuffle_buffer: int = 1000,
        on_error: str = "raise",
        cache_mb: float = 0,
        gather: str = "host",
        map_files: bool = True,
    ):
        if mode not in ("exact", "resampled"):
            raise ValueError(f"shard mode {mode!r}: use exact or resampled")
        if gather not in ("host", "device"):
            raise ValueError(f"shards.gather {gather!r}: use host or device")
        if gather == "device" and workers > 0:
            raise ValueError(DEVICE_GATHER_WORKERS)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error {on_error!r}: use raise or skip")
        self.gather = gather
        self.shard_dir, self.manifest = Path(shard_dir), manifest
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.processes = max(0, workers)  # DataLoader worker processes (0: in this process)
        self.workers = max(1, workers)  # logical workers of the plan
        self.seed, self.mode, self.shuffle_buffer, self.on_error = (
            seed,
            mode,
            shuffle_buffer,
            on_error,
        )
        self.sample_mode = manifest["mode"]
        self.epoch, self.start_batch = 0, 0
        self._steps: dict[int, int] = {}
        # Decoded shards kept for later epochs, up to cache_mb of shard bytes per worker (filled
        # once, never evicted: epochs visit shards in random order, so any subset hits as often).
        self.cache_bytes = int(cache_mb * 1e6)
        self._cache: dict[str, ShardColumns] = {}
        self._buffers = ReadBuffers()  # where files are read when they are not mapped
        self.map_files = map_files  # shards.map_files: mmap each file instead of a copy
        self._cached = 0
        # batches gathered at once (about GATHER_BYTES of shard bytes, 1 to 16), and batches a
        # worker hands over at once (about HANDOVER_BYTES, up to 64; in process, one gather)
        shards = manifest["shards"]
        sample_bytes = sum(s["bytes"] for s in shards) / max(1, sum(s["count"] for s in shards))
        batch_bytes = batch_size * sample_bytes
        self.gather_batches = int(min(16, max(1, GATHER_BYTES // batch_bytes)))
        self.group_batches = self.gather_batches
        if self.processes:
            self.group_batches = int(
                min(64, max(self.gather_batches, HANDOVER_BYTES // batch_bytes))
            )
        self.group_bytes = self.group_batches * batch_bytes  # shard bytes behind a group
        if len(manifest["shards"]) < world:
            raise ShardError(
                f"{self.shard_dir}: {len(manifest['shards'])} shards for {world} ranks; write smaller shards"
            )

    def _plan(self, epoch: int) -> list[list[list[dict]]]:
        return plan_epoch(self.manifest["shards"], epoch, self.seed, self.world, self.workers)

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Batches each rank gets in `epoch` (default: the current one); the same on every rank."""
        if self.mode == "resampled":
            return self.manifest["examples"] // (self.batch_size * self.world)
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._steps:  # the job asks every step: plan each epoch once
            self._steps[epoch] = (
                batches_per_worker(self._plan(epoch), self.batch_size) * self.workers
            )
        return self._steps[epoch]

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Read from epoch `epoch`, batch `start_batch` on (exact mode resumes there)."""
        self.epoch, self.start_batch = epoch, start_batch

    def worker_positions(self) -> list[dict]:
        """(shard, offset) where each worker of this rank resumes: recorded in checkpoints."""
        plan = self._plan(self.epoch)[self.rank]
        positions = []
        for worker in range(self.workers):
            skip = self._skipped_batches(worker) * self.batch_size
            for shard in plan[worker]:
                if skip < shard["count"]:
                    positions.append({"worker": worker, "shard": shard["file"], "offset": skip})
                    break
                skip -= shard["count"]
        return positions

    def _skipped_batches(
        self, worker: int, start_batch: int | None = None, epoch: int | None = None
    ) -> int:
        """Batches logical `worker` made before batch `start_batch` of `epoch` (default: the
        position set by `set_position`)."""
        rounds, into, size = self._round_at(start_batch, epoch)
        return rounds * self.group_batches + min(max(into - worker * size, 0), size)

    def _owner(self, start_batch: int, epoch: int) -> int:
        """The logical worker whose group holds batch `start_batch` of `epoch` (0 past its end)."""
        _, into, size = self._round_at(start_batch, epoch)
        return into // size if size and into < self.workers * size else 0

    def _round_at(self, start_batch: int | None, epoch: int | None) -> tuple[int, int, int]:
        """(rounds before it, batches into its round, its groups' size) of a batch of an epoch.

        A worker makes its batches in groups of `group_batches` (the last group of an epoch may
        be smaller) and the rank takes whole groups in turn from workers 0..W-1: round r holds
        group r of every worker. Every worker makes the same number of batches in an epoch, so
        every round's groups have one size, and a position maps to each worker's count."""
        start = self.start_batch if start_batch is None else start_batch
        group, workers = self.group_batches, self.workers
        per_worker = self.steps_per_epoch(epoch) // workers
        full_rounds = per_worker // group
        if start < full_rounds * workers * group:
            rounds, into = divmod(start, workers * group)
            return rounds, into, group
        return full_rounds, start - full_rounds * workers * group, per_worker - full_rounds * group

    # ---- reading -----------------------------------------------------------------------------
    def read_shard(self, shard: dict) -> ShardColumns:
        """All samples of one shard, checked against the manifest's count (from the cache after
        the first read when it fits)."""
        if shard["file"] in self._cache:
            return self._cache[shard["file"]]
        path = self.shard_dir / shard["file"]
        blocks = read_blocks(path, self._buffers, self.map_files)
        columns = ShardColumns(blocks) if blocks else None
        found = len(columns) if columns is not None else 0
        if found != shard["count"]:
            raise ShardError(
                f"{path}: {found} samples, manifest says {shard['count']} (truncated?)"
            )
        if self._cached + shard["bytes"] <= self.cache_bytes:
            self._cache[shard["file"]] = columns
            self._cached += shard["bytes"]
        return columns

    def _read_or_skip(self, shard: dict, skipped: list[str]) -> ShardColumns | None:
        """The shard's columns, or None (reason appended to `skipped`) when on_error is skip."""
        try:
            return self.read_shard(shard)
        except ShardError as error:
            if self.on_error == "raise":
                raise
            log.warning("skipping shard: %s", error)
            skipped.append(str(error))
            return None

    def _exact_epoch(self, epoch: int, worker: int, skip: int, skipped: list[str]):
        """(columns, sample indices) runs of one worker's epoch, from sample `skip` on; after a
        skipped shard, its other shards again until the epoch's quota is met."""
        shards = self._plan(epoch)[self.rank][worker]
        good: list[dict] = []
        damaged = False
        orders = self._sample_orders(shards, epoch)
        for shard in shards:
            order = next(orders)
            if skip >= shard["count"]:
                skip -= shard["count"]
                good.append(shard)
                continue
            columns = self._read_or_skip(shard, skipped)
            if columns is None:
                damaged = True
                continue
            good.append(shard)
            yield columns, order[skip:]
            skip = 0
        if not damaged:
            return
        if not good:
            raise ShardError(
                f"rank {self.rank} worker {worker}: every shard of epoch {epoch} is damaged"
            )
        for shard in itertools.cycle(good):  # the quota of batches is met from the good shards
            columns = self._read_or_skip(shard, skipped)
            if columns is not None:
                yield columns, self._sample_order(shard, epoch)

    def _sample_order(self, shard: dict, epoch: int) -> np.ndarray:
        """The order of a shard's samples in an epoch: seeded by epoch and shard, which is what
        fixes the batches."""
        rng = np.random.default_rng([self.seed, epoch, zlib.crc32(shard["file"].encode())])
        return rng.permutation(shard["count"])

    def _sample_orders(self, shards: list[dict], epoch: int) -> Iterator[np.ndarray]:
        """`_sample_order` of each shard, made SAMPLE_ORDERS_AHEAD shards at a time: made one by
        one between shard reads, each of which flushes the CPU's caches, a generator costs 3-4x
        its time in a row (40-70 us against 16 us a shard)."""
        for start in range(0, len(shards), SAMPLE_ORDERS_AHEAD):
            ahead = shards[start : start + SAMPLE_ORDERS_AHEAD]
            yield from [self._sample_order(shard, epoch) for shard in ahead]

    def _resampled_runs(self, skipped: list[str]):
        rng = random.Random()  # fresh entropy: a restart must not replay the same stream
        by_url = {str(self.shard_dir / s["file"]): s for s in self.manifest["shards"]}
        shards = wds.ResampledShards(list(by_url), seed=rng.randrange(2**31), deterministic=True)
        buffer: list[tuple[ShardColumns, int]] = []
        for item in shards:
            columns = self._read_or_skip(by_url[item["url"]], skipped)
            if columns is None:
                continue
            buffer.extend((columns, index) for index in range(len(columns)))
            while len(buffer) >= max(self.shuffle_buffer, self.batch_size):
                picks: dict[int, tuple[ShardColumns, list[int]]] = {}
                for _ in range(self.batch_size):  # one batch's samples, grouped by shard
                    columns, index = buffer.pop(rng.randrange(len(buffer)))
                    picks.setdefault(id(columns), (columns, []))[1].append(index)
                for columns, indices in picks.values():
                    yield columns, np.asarray(indices)

    def _batches(
        self, runs, limit: int | None, skipped: list[str], pack: bool, done: int = 0
    ) -> Iterator:
        """Batches of `batch_size` samples from (columns, indices) runs, at most `limit`; markers
        for skips. Up to `gather_batches` batches are gathered and split at once (`to_batches`,
        GATHER_BYTES); a group of `group_batches` crosses from a worker process as one item
        (`pack`, HANDOVER_BYTES). The groups start at the worker's batch 0 of the epoch (`done`:
        batches it made before these), which is what makes a position one number (`_round_at`).
        The runs of an exact epoch always hold `limit` batches, and samples beyond them are left
        out of that epoch (every worker makes the same number of batches)."""
        parts, have, made = [], 0, 0
        group: list[dict[str, torch.Tensor]] = []  # batches of the worker's group, not yet packed

        def left_in_group() -> int:
            batches = self.group_batches - (done + made) % self.group_batches
            return batches if limit is None else min(batches, limit - made)

        def wanted() -> int:  # samples of the next gather: at most the rest of the current group
            return min(self.gather_batches, left_in_group()) * self.batch_size

        def assembled(parts: list) -> Iterator:
            if self.gather == "device":  # assembled where the model runs: iter_batches
                yield GatherPlan(parts, self.batch_size, self.sample_mode)
                return
            batches = to_batches(gather(parts), self.batch_size, self.sample_mode)
            if not pack:
                yield from batches
                return
            group.extend(batches)
            if left_in_group() == len(batches):  # the group is complete: one item, one segment
                yield pack_batches(group)
                group.clear()

        target = wanted()
        for columns, indices in runs:
            if skipped:  # a marker, not a batch: the job counts and logs it
                yield {"skipped_shards": list(skipped)}
                skipped.clear()
            while len(indices):
                chunk, indices = indices[: target - have], indices[target - have :]
                parts.append((columns, chunk))
                have += len(chunk)
                if have == target:
                    yield from assembled(parts)
                    made += target // self.batch_size
                    parts, have = [], 0
                    if limit is not None and made >= limit:
                        return
                    target = wanted()
        if skipped:
            yield {"skipped_shards": list(skipped)}

    def __iter__(self):
        info = get_worker_info()
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(
                f"stream built for {self.workers} workers, DataLoader has {info.num_workers}"
            )
        loader_worker = info.id if info is not None else 0
        pack = info is not None  # batches cross from a worker process: one shared-memory buffer
        skipped: list[str] = []
        if self.mode == "resampled":
            yield from self._batches(self._resampled_runs(skipped), None, skipped, pack)
            return
        # The DataLoader always starts its round-robin at worker 0; batch `start_batch` belongs to
        # the group of logical worker `_owner`, so loader worker i plays logical worker
        # owner + i (in every later epoch too: each worker hands over as many groups per epoch).
        start_epoch, start_batch = self.epoch, self.start_batch  # set_position may change them
        worker = (loader_worker + self._owner(start_batch, start_epoch)) % self.workers
        for epoch in itertools.count(start_epoch):
            skip = 0
            if epoch == start_epoch:
                skip = self._skipped_batches(worker, start_batch, epoch)
            full = self.steps_per_epoch(epoch) // self.workers
            if full == 0:
                raise ShardError(
                    f"{self.shard_dir}: epoch {epoch} leaves a worker without one full batch of "
                    f"{self.batch_size}: use fewer workers or ranks, or smaller batches"
                )
            limit = full - skip
            if limit <= 0:
                continue
            runs = self._exact_epoch(epoch, worker, skip * self.batch_size, skipped)
            yield from self._batches(runs, limit, skipped, pack, done=skip)


def shared_memory_warning(
    stream: TeacherShardStream, prefetch: int, local_ranks: int, shm: str = "/dev/shm"
) -> str | None:
    """A warning when `shm` has less room than this machine's loader workers may hold there at
    once (each worker: the groups it prefetched and the one it fills), or None. A worker that
    runs out of it dies with a bus error in the middle of a job; containers often get 64 MB."""
    if stream.processes == 0:
        return None
    try:
        stats = os.statvfs(shm)
    except OSError:  # no such file system here: torch shares memory another way
        return None
    free = stats.f_bavail * stats.f_frsize
    needed = local_ranks * stream.processes * (prefetch + 1) * stream.group_bytes
    if needed <= free:
        return None
    return (
        f"warning: {shm} has {free / 1e6:.0f} MB free, and the loader workers of {local_ranks} "
        f"rank(s) here may hold about {needed / 1e6:.0f} MB there at once ({stream.processes} "
        f"workers a rank x (shards.prefetch {prefetch} + 1) groups of about "
        f"{stream.group_bytes / 1e6:.1f} MB): a worker that runs out dies with a bus error. Give "
        f"{shm} more room (docker run --shm-size=...), or lower shards.prefetch or shards.workers"
    )


def make_loader(
    stream: TeacherShardStream, pin_memory: bool = False, prefetch: int = 4
) -> Iterable:
    """The stream's items for the training loop: through a DataLoader when worker processes read
    the shards or host batches are pinned, else the stream itself (a DataLoader with no workers
    only adds its per-item bookkeeping: a profiler range, the sampler, the fetcher, up to 0.12 ms
    an item here). GatherPlans are never pinned (DeviceGather pins what it copies)."""
    workers = stream.processes
    if workers == 0 and not (pin_memory and stream.gather == "host"):
        return stream
    # batch_size=None: batches are made inside the workers, one group of batches per item, taken
    # in strict round-robin order, which is what makes an exact-mode position one number.
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers else None,
        persistent_workers=workers > 0,
        collate_fn=_as_is,
        # Its own generator: creating a DataLoader iterator draws a seed, and drawing it from the
        # global RNG would shift dropout and negative sampling after a resume.
        generator=torch.Generator().manual_seed(stream.seed),
    )


def _as_is(batch):
    return batch
