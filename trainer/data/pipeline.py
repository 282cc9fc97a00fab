"""Interaction log -> per-user chronological sequences, out of core.

1. Partition: the log is streamed in chunks and hash-partitioned by user into Arrow files, so
   every user's events land in one part and each part fits in memory on its own.
2. k-core: rounds over the parts (in parallel) drop items and users below the thresholds until
   nothing changes; only the item counts (one row per item) cross parts.
3. Build: each part is re-indexed against the global item vocabulary, stably sorted by
   (user, time, file order) and cut into leave-one-out splits, vectorised with numpy.
4. The parts become one `datasets.DatasetDict` (memory-mapped, never all in RAM).

The number of parts depends on the input size only, never on `num_proc`, so the output is the
same whatever the parallelism. All work happens in a temporary folder beside the output that is
renamed into place at the end: a failed run leaves nothing half-written.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recdistill.trainer.data.formats import EVENT_SCHEMA, DataError

PART_TARGET_BYTES = 48 << 20  # input bytes per part: bounds each worker's memory
BYTES_PER_SYNTHETIC_EVENT = 20
ITEM_MAP_FILE = "item_map.parquet"
STATS_FILE = "stats.json"
DATASET_DIR = "dataset"
TRAIN_SCHEMA = pa.schema([("user", pa.string()), ("items", pa.list_(pa.int32()))])
EVAL_SCHEMA = pa.schema(
    [("user", pa.string()), ("history", pa.list_(pa.int32())), ("target", pa.int32())]
)


@dataclass
class PrepareOptions:
    min_user_interactions: int = 5
    min_item_interactions: int = 5
    max_seq_len: int = 200  # 0: keep whole histories (the jobs cut their own windows)
    num_proc: int = 1
    num_parts: int | None = None  # None: from the input size
    source: dict = field(default_factory=dict)  # what was read, recorded in stats.json


def _write_ipc(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _read_ipc(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def user_part(users: pa.Array, num_parts: int) -> np.ndarray:
    """Stable hash partition of user ids (pandas' hash does not depend on the process seed)."""
    hashes = pd.util.hash_array(np.asarray(users.to_numpy(zero_copy_only=False), dtype=object))
    return (hashes % np.uint64(num_parts)).astype(np.int64)


def partition_events(chunks: Iterable[pa.Table], parts_dir: Path, num_parts: int) -> int:
    """Write every chunk's rows to the part of their user; returns the number of events."""
    writers = [
        pa.ipc.new_stream(str(parts_dir / f"part-{i:05d}.arrow"), EVENT_SCHEMA)
        for i in range(num_parts)
    ]
    total = 0
    try:
        for chunk in chunks:
            parts = user_part(chunk.column("user"), num_parts)
            order = np.argsort(parts, kind="stable")
            sorted_chunk = chunk.take(pa.array(order))
            bounds = np.searchsorted(parts[order], np.arange(num_parts + 1))
            for part in range(num_parts):
                if bounds[part + 1] > bounds[part]:
                    writers[part].write_table(
                        sorted_chunk.slice(bounds[part], bounds[part + 1] - bounds[part])
                    )
            total += chunk.num_rows
    finally:
        for writer in writers:
            writer.close()
    return total


def _kcore_round(path: str, invalid_items: list[str], min_user: int) -> tuple[pa.Table, int, int]:
    """One k-core round on one part: drop invalid items, then short users; count items."""
    table = _read_ipc(Path(path))
    rows_before = table.num_rows
    if invalid_items:
        table = table.filter(
            pc.invert(pc.is_in(table.column("item"), pa.array(invalid_items, pa.string())))
        )
    user_counts = table.group_by("user").aggregate([("user", "count")])
    short = user_counts.filter(pc.less(user_counts.column("user_count"), min_user)).column("user")
    users_removed = len(short)
    if users_removed:
        table = table.filter(pc.invert(pc.is_in(table.column("user"), short)))
    if table.num_rows != rows_before:
        scratch = Path(path + ".tmp")
        _write_ipc(scratch, table)
        os.replace(scratch, path)
    item_counts = table.group_by("item").aggregate([("item", "count")])
    return item_counts, table.num_rows, users_removed


def _item_sort_key(items: pa.Array) -> np.ndarray:
    """Integer ids sort numerically (so ids 1..N keep their order), anything else as strings."""
    values = items.to_numpy(zero_copy_only=False)
    try:
        numeric = values.astype(np.int64)
        if (numeric.astype(str) == values.astype(str)).all():
            return np.argsort(numeric, kind="stable")
    except (ValueError, OverflowError):
        pass
    return np.argsort(values.astype(str), kind="stable")


def _ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and gather indices that concatenate the ranges [start, end) of a flat array."""
    lengths = ends - starts
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return offsets, index


def _lists(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> pa.Array:
    offsets, index = _ranges(starts, ends)
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values[index], pa.int32())
    )


def _build_part(
    path: str, vocab_path: str, max_seq_len: int, out_dir: str, part: int
) -> np.ndarray:
    """Sort one part by (user, time, order), re-index items, write train/valid/test tables.

    Returns the per-user sequence lengths (before truncation) for the statistics.
    """
    table = _read_ipc(Path(path))
    vocab = pq.read_table(vocab_path, columns=["raw_item"]).column("raw_item").combine_chunks()
    table = table.sort_by([("user", "ascending"), ("time", "ascending"), ("order", "ascending")])
    items = (
        pc.add(pc.index_in(table.column("item"), value_set=vocab), 1).to_numpy().astype(np.int32)
    )
    user_codes = pc.dictionary_encode(table.column("user")).combine_chunks().indices.to_numpy()
    new_user = (
        np.concatenate([[True], user_codes[1:] != user_codes[:-1]])
        if len(items)
        else np.zeros(0, bool)
    )
    starts = np.flatnonzero(new_user)
    ends = np.append(starts[1:], len(items)).astype(np.int64)
    users = table.column("user").take(pa.array(starts))
    lengths = ends - starts
    if max_seq_len <= 0:  # whole histories
        max_seq_len = int(lengths.max(initial=0))

    # Leave-one-out: last item test, second to last validation; users with fewer than 3
    # events have no held-out items and train on all of theirs.
    held_out = lengths >= 3
    train_end = np.where(held_out, ends - 2, ends)
    train_start = np.maximum(starts, train_end - (max_seq_len + 1))  # inputs + next-item targets
    train = pa.table(
        {"user": users, "items": _lists(items, train_start, train_end)}, schema=TRAIN_SCHEMA
    )
    split_tables = {"train": train}
    eval_users = users.filter(pa.array(held_out))
    e_starts, e_ends = starts[held_out], ends[held_out]
    for split, target_at in (("valid", e_ends - 2), ("test", e_ends - 1)):
        history_start = np.maximum(e_starts, target_at - max_seq_len)
        split_tables[split] = pa.table(
            {
                "user": eval_users,
                "history": _lists(items, history_start, target_at),
                "target": pa.array(items[target_at], pa.int32()),
            },
            schema=EVAL_SCHEMA,
        )
    for split, split_table in split_tables.items():
        _write_ipc(Path(out_dir) / f"{split}-{part:05d}.arrow", split_table)
    return lengths


class _Runner:
    """Runs per-part functions inline (num_proc=1) or in a process pool."""

    def __init__(self, num_proc: int):
        self.pool = None
        if num_proc > 1:
            # spawn, not fork: forking a process that already runs Arrow's threads can deadlock.
            self.pool = futures.ProcessPoolExecutor(
                num_proc, mp_context=multiprocessing.get_context("spawn")
            )

    def map(self, fn, *iterables) -> list:
        if self.pool is None:
            return [fn(*args) for args in zip(*iterables)]
        return list(self.pool.map(fn, *iterables))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def kcore_filter(
    part_paths: list[Path], min_user: int, min_item: int, runner: _Runner
) -> tuple[pa.Table, int, int]:
    """Iterate rounds until no user or item is below its threshold.

    Returns the final item counts, the number of surviving interactions and the rounds run.
    """
    invalid: list[str] = []
    rounds = 0
    while True:
        rounds += 1
        results = runner.map(
            _kcore_round,
            [str(p) for p in part_paths],
            [invalid] * len(part_paths),
            [min_user] * len(part_paths),
        )
        counts = (
            pa.concat_tables([r[0] for r in results])
            .group_by("item")
            .aggregate([("item_count", "sum")])
        )
        counts = counts.rename_columns(["item", "count"])
        rows = sum(r[1] for r in results)
        users_removed = sum(r[2] for r in results)
        low = counts.filter(pc.less(counts.column("count"), min_item))
        if rows == 0 or (len(low) == 0 and users_removed == 0):
            return counts, rows, rounds
        invalid = low.column("item").to_pylist()


def _percentiles(lengths: np.ndarray) -> dict:
    qs = {"min": 0, "p25": 25, "p50": 50, "p75": 75, "p90": 90, "p99": 99, "max": 100}
    values = {name: float(np.percentile(lengths, q)) for name, q in qs.items()}
    values["mean"] = float(lengths.mean())
    return values


def vocab_sha256(raw_items: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for raw in raw_items:
        digest.update(raw.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _num_parts(size_bytes: int, options: PrepareOptions) -> int:
    if options.num_parts:
        return options.num_parts
    return max(1, -(-size_bytes // PART_TARGET_BYTES))


def prepare_dataset(
    chunks: Iterator[pa.Table],
    size_bytes: int,
    output: Path,
    options: PrepareOptions,
    overwrite: bool = False,
    progress=print,
) -> dict:
    """Run the whole data stage; returns the statistics also written to `stats.json`."""
    # Imported here: `datasets` is slow to import and the workers never need it.
    from datasets import DatasetDict

    output = Path(output)
    if output.exists() and not overwrite:
        raise DataError(f"{output}: output already exists (pass --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    runner = _Runner(options.num_proc)
    started = time.perf_counter()
    try:
        num_parts = _num_parts(size_bytes, options)
        parts_dir, built_dir, final = work / "parts", work / "built", work / "final"
        for folder in (parts_dir, built_dir, final):
            folder.mkdir()
        total = partition_events(chunks, parts_dir, num_parts)
        if total == 0:
            raise DataError(f"{options.source.get('input', 'input')}: no interactions found")
        progress(
            f"partitioned {total:,} events into {num_parts} parts ({time.perf_counter() - started:.1f}s)"
        )
        part_paths = sorted(parts_dir.glob("part-*.arrow"))

        counts, kept, rounds = kcore_filter(
            part_paths, options.min_user_interactions, options.min_item_interactions, runner
        )
        if kept == 0:
            raise DataError(
                f"{options.source.get('input', 'input')}: k-core filtering (min user interactions "
                f"{options.min_user_interactions}, min item interactions {options.min_item_interactions}) "
                f"removed every interaction of the {total:,} read"
            )
        progress(
            f"k-core: {kept:,} interactions left after {rounds} rounds ({time.perf_counter() - started:.1f}s)"
        )

        raw_items = counts.column("item").combine_chunks()
        raw_items = raw_items.take(pa.array(_item_sort_key(raw_items)))
        item_map = pa.table(
            {
                "item_id": pa.array(np.arange(1, len(raw_items) + 1, dtype=np.int32)),
                "raw_item": raw_items,
            }
        )
        pq.write_table(item_map, final / ITEM_MAP_FILE)
        lengths = runner.map(
            _build_part,
            [str(p) for p in part_paths],
            [str(final / ITEM_MAP_FILE)] * num_parts,
            [options.max_seq_len] * num_parts,
            [str(built_dir)] * num_parts,
            range(num_parts),
        )
        lengths = np.concatenate(lengths)
        splits = DatasetDict(
            {
                split: _concatenate_parts(sorted(built_dir.glob(f"{split}-*.arrow")), schema)
                for split, schema in (
                    ("train", TRAIN_SCHEMA),
                    ("valid", EVAL_SCHEMA),
                    ("test", EVAL_SCHEMA),
                )
            }
        )
        # An empty split must still get one shard: `load_from_disk` cannot read a zero-shard split.
        splits.save_to_disk(
            str(final / DATASET_DIR),
            num_shards={k: 1 for k, v in splits.items() if not len(v)} or None,
        )
        stats = {
            "users": int(lengths.size),
            "items": int(len(raw_items)),
            "interactions": int(kept),
            "input_interactions": int(total),
            "kcore_rounds": rounds,
            "sequence_length": _percentiles(lengths),
            "splits": {split: len(ds) for split, ds in splits.items()},
            "item_vocab_sha256": vocab_sha256(raw_items.to_pylist()),
            "options": asdict(options),
            "seconds": round(time.perf_counter() - started, 2),
        }
        (final / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        del splits
        _replace_dir(final, output)
        return stats
    finally:
        runner.close()
        shutil.rmtree(work, ignore_errors=True)


def _concatenate_parts(paths: list[Path], schema: pa.Schema):
    """One memory-mapped `datasets.Dataset` over the parts' Arrow files (empty parts skipped)."""
    from datasets import Dataset, Features, concatenate_datasets

    parts = [Dataset.from_file(str(p)) for p in paths]
    parts = [part for part in parts if len(part)]
    if not parts:
        return Dataset.from_dict(
            {name: [] for name in schema.names}, features=Features.from_arrow_schema(schema)
        )
    return concatenate_datasets(parts)


def _replace_dir(new: Path, output: Path) -> None:
    """Move `new` to `output`; an old `output` is only deleted once the new one is in place."""
    if output.exists():
        backup = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, backup)
        os.replace(new, output)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(new, output)


def load_sequences(data_dir: str | Path):
    """The prepared `DatasetDict` (train/valid/test), its stats and the item map."""
    from datasets import load_from_disk

    data_dir = Path(data_dir)
    if not (data_dir / STATS_FILE).is_file():
        raise DataError(
            f"{data_dir}: not a prepared data folder (no {STATS_FILE}); run trainer/prepare_data.py"
        )
    stats = json.loads((data_dir / STATS_FILE).read_text())
    return load_from_disk(str(data_dir / DATASET_DIR)), stats


def item_vocabulary(data_dir: str | Path) -> dict[str, int]:
    """raw item id (string) -> the folder's item id 1..N."""
    path = Path(data_dir) / ITEM_MAP_FILE
    if not path.is_file():
        raise DataError(f"{data_dir}: no {ITEM_MAP_FILE}; run trainer/prepare_data.py first")
    table = pq.read_table(path).to_pydict()
    return dict(zip(table["raw_item"], table["item_id"]))


def whole_sequences(data_dir: str | Path, vocab: dict[str, int]) -> tuple[list, list[np.ndarray]]:
    """Another prepared folder's users and each one's whole sequence (its test history and
    target) in `vocab`'s ids, matched by raw item id; an item `vocab` lacks becomes 0."""
    splits, _ = load_sequences(data_dir)
    own = item_vocabulary(data_dir)
    to_vocab = np.zeros(max(own.values(), default=0) + 1, np.int64)  # folder id -> vocab id
    for raw, item_id in own.items():
        to_vocab[item_id] = vocab.get(raw, 0)
    test = splits["test"]
    sequences = [
        to_vocab[np.asarray([*history, target], np.int64)]
        for history, target in zip(test["history"], test["target"])
    ]
    return test["user"], sequences
