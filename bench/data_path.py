"""The data path alone: how fast teacher shards become training batches, measured in one run
against the raw read rate of the same files and against the format-1 loader on the same samples.

    python bench/data_path.py --shards runs/demo/shards              # any format-2 shard folder
    python bench/data_path.py --shards runs/bench_cpu/ml-1m/shards --workers 0 1 2
    python bench/data_path.py --shards DIR --workers 0 --shard-size 1000   # the same samples, bigger shards
    python bench/data_path.py --shards DIR --workers 0 --shard-size 2500 --block-size 1024  # 3 blocks a shard
    python bench/data_path.py --shards DIR --workers 0 --copy-files   # files read, not mapped

For each loader setting, batches are drawn for --epochs epochs exactly as trainer/distill.py draws
them (TeacherShardStream -> make_loader -> iter_batches; no model), the first item left out
(worker start-up). Reported: samples/s, target positions/s, MB/s of shard bytes, and the same per
worker process (0 workers = reading in the training process, counted as one). Then
`shards.gather: device`, in the training process: the loader alone (it reads and checks the
shards and yields GatherPlans, no batch made), and with the batches also assembled on --device
(torch, DeviceGather). Each row also gives the training thread's own CPU time per batch (what
the training loop pays to get a batch: with workers, receiving their handed-over groups; in
process, making the batches). The raw read rate is reading the same files whole into one reused buffer
(`readinto`, warm page cache: copying bytes already in memory at this machine's copy rate; a
read into new memory runs at the page-fault rate, 2-3 GB/s here). The loader maps the files
instead (`shards.map_files`, the default), so it makes no such copy and reads each byte first in its
checksum pass: its rate can pass this yardstick's. The yardstick is measured before every loader
run and after the last, the best of them reported (this machine's rate drifts by up to 2x
between minutes). The format-1 baseline writes the
same samples as earlier versions did (one safetensors blob per sample) and reads them as they did:
webdataset's tar reader, a per-sample decode and a row-by-row collate, in the training process.
Last, each part of the in-process loader alone (`loader_parts`): reading and decoding the shards
one at a time, and assembling batches from decoded shards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from recdistill.trainer.data.legacy_shards import decode_sample, write_format1
from recdistill.trainer.data.shard_stream import (
    GatherPlan,
    TeacherShardStream,
    iter_batches,
    make_loader,
)
from recdistill.trainer.data.shards import (
    MANIFEST,
    ShardSink,
    iter_samples,
    load_manifest,
    verify_group,
    write_json_atomic,
)


def cold_read_mb_per_s(files: list[Path]) -> float | None:
    """Read rate from the disk: the files read once after the kernel dropped its page cache (root
    only: None where /proc/sys/vm/drop_caches cannot be written)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return None
    started = time.perf_counter()
    total = sum(len(path.read_bytes()) for path in files)
    return total / (time.perf_counter() - started) / 1e6


def raw_read_mb_per_s(files: list[Path], passes: int) -> float:
    for path in files:  # warm the page cache
        path.read_bytes()
    buffer = memoryview(bytearray(max(path.stat().st_size for path in files)))
    started = time.perf_counter()
    total = 0
    for _ in range(passes):
        for path in files:
            with open(path, "rb", buffering=0) as handle:
                total += handle.readinto(buffer)
    return total / (time.perf_counter() - started) / 1e6


def plan_sizes(plan: GatherPlan) -> tuple[int, int]:
    """(samples, target positions) of a GatherPlan, from the shards' counts."""
    samples = sum(len(indices) for _, indices in plan.parts)
    return samples, sum(int(columns.counts["targets"][i].sum()) for columns, i in plan.parts)


def loader_rates(
    shard_dir: Path,
    manifest: dict,
    batch_size: int,
    workers: int,
    epochs: int,
    gather: str = "host",
    device: str | None = None,
    map_files: bool = True,
) -> dict:
    """The loader's rates over `epochs` epochs. gather="device": the loader alone yields
    GatherPlans (reading and checking shards, no batch made), or with `device` the batches are
    also assembled there, as trainer/distill.py does with shards.gather=device."""
    stream = TeacherShardStream(
        shard_dir, manifest, 0, 1, batch_size, workers, seed=0, gather=gather, map_files=map_files
    )
    batches = sum(stream.steps_per_epoch(epoch) for epoch in range(epochs))
    plans_only = gather == "device" and device is None
    loader = make_loader(stream)
    iterator = iter(loader) if plans_only else iter_batches(loader, device or "cpu")

    def sizes(item) -> tuple[int, int]:  # (samples, target positions)
        return plan_sizes(item) if plans_only else (len(item["lengths"]), len(item["targets"]))

    # worker start-up and the first shard read are not the steady state
    left = batches * batch_size - sizes(next(iterator))[0]
    started, main_thread_started = time.perf_counter(), time.thread_time()
    samples = positions = 0
    while samples < left:
        taken, targets = sizes(next(iterator))
        samples += taken
        positions += targets
    if device is not None and device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    main_thread_seconds = time.thread_time() - main_thread_started
    shard_bytes = manifest["bytes"] * samples / manifest["examples"]  # bytes behind these samples
    processes = max(1, workers)
    return {
        "workers": workers,
        "gather": gather if device is None else f"{gather} ({device})",
        "device": device,  # where the batches were made (None: by the loader, or not made)
        "samples_per_s": samples / seconds,
        "positions_per_s": positions / seconds,
        "mb_per_s": shard_bytes / seconds / 1e6,
        "positions_per_s_per_worker": positions / seconds / processes,
        "mb_per_s_per_worker": shard_bytes / seconds / 1e6 / processes,
        # what the training loop's thread spends per batch to get it (with workers: receiving
        # the handed-over groups; in process: making the batches)
        "main_thread_ms_per_batch": 1e3 * main_thread_seconds / (samples / batch_size),
    }


def loader_parts(
    shard_dir: Path, manifest: dict, batch_size: int, epochs: int, map_files: bool = True
) -> dict:
    """Where the in-process loader's time goes: each part alone over the same shards, in MB/s of
    shard bytes. `read_decode`: TeacherShardStream.read_shard (the file mapped, or read with
    --copy-files; tar headers, checksum, array views), one shard at a time, each dropped before the next as the loader drops
    a gathered shard; `assemble`: the stream's batching of shards already decoded (gathers and
    `to_batches`)."""
    stream = TeacherShardStream(
        shard_dir, manifest, 0, 1, batch_size, 0, seed=0, map_files=map_files
    )
    shards = manifest["shards"]
    megabytes = sum(shard["bytes"] for shard in shards) * epochs / 1e6
    # decoded once for `assemble` by a stream of its own: these stay alive, and would hold the
    # timed stream's reusable read buffers
    kept = TeacherShardStream(shard_dir, manifest, 0, 1, batch_size, 0, seed=0)
    columns = [kept.read_shard(shard) for shard in shards]  # also warms the page cache

    def rate(epoch_work) -> float:
        started = time.perf_counter()
        for _ in range(epochs):
            epoch_work()
        return megabytes / (time.perf_counter() - started)

    def read_decode() -> None:
        for shard in shards:
            stream.read_shard(shard)

    def assemble() -> None:
        runs = ((c, np.random.default_rng(0).permutation(len(c))) for c in columns)
        for _ in stream._batches(runs, None, [], pack=False):
            pass

    return {"read_decode_mb_per_s": rate(read_decode), "assemble_mb_per_s": rate(assemble)}


def collate_format1(samples: list[dict[str, np.ndarray]], mode: str) -> dict[str, torch.Tensor]:
    """The format-1 loader's collate, row by row into [B, L, ...] (kept here as the baseline)."""
    batch = len(samples)
    width = max(len(s["item_ids"]) for s in samples)
    k = samples[0]["topk_ids"].shape[1]
    n_temps = samples[0]["logsumexp"].shape[1]
    out = {
        "item_ids": torch.zeros(batch, width, dtype=torch.long),
        "targets": torch.zeros(batch, width, dtype=torch.long),
        "teacher_topk_ids": torch.zeros(batch, width, k, dtype=torch.long),
        "teacher_topk_scores": torch.zeros(batch, width, k),
        "teacher_confidence": torch.zeros(batch, width, k),
        "teacher_logsumexp": torch.zeros(batch, width, n_temps),
    }
    hidden_keys = [k for k in samples[0] if k.startswith("hidden_") and k != "hidden_positions"]
    for row, sample in enumerate(samples):
        n = len(sample["item_ids"])
        at = slice(0, n) if mode == "sequence" else slice(n - 1, n)
        out["item_ids"][row, :n] = torch.from_numpy(sample["item_ids"].astype(np.int64))
        out["targets"][row, at] = torch.from_numpy(sample["targets"].astype(np.int64))
        out["teacher_topk_ids"][row, at] = torch.from_numpy(sample["topk_ids"].astype(np.int64))
        for name in ("topk_scores", "confidence", "logsumexp"):
            out[f"teacher_{name}"][row, at] = torch.from_numpy(sample[name].astype(np.float32))
    for key in hidden_keys:
        if not key.endswith("_scale"):
            out[key] = torch.from_numpy(np.stack([s[key].astype(np.float32) for s in samples]))
    return out


def format1_rates(shard_dir: Path, manifest: dict, batch_size: int, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        old_dir = Path(scratch) / "v1"
        write_format1(shard_dir, old_dir)
        old = json.loads((old_dir / "manifest.json").read_text())
        started = time.perf_counter()
        samples = positions = 0
        for epoch in range(epochs):
            shards = list(old["shards"])
            random.Random(epoch).shuffle(shards)
            pending: list = []
            for shard in shards:
                url = str(old_dir / shard["file"])
                loaded = [
                    decode_sample(raw["safetensors"], raw["__key__"])
                    for raw in wds.tarfile_to_samples()(iter([{"url": url}]))
                ]
                random.Random(f"{epoch}-{shard['file']}").shuffle(loaded)
                pending += loaded
                while len(pending) >= batch_size:
                    batch = collate_format1(pending[:batch_size], old["mode"])
                    pending = pending[batch_size:]
                    samples += batch_size
                    positions += int((batch["targets"] > 0).sum())
        seconds = time.perf_counter() - started
    shard_bytes = old["bytes"] * samples / old["examples"]
    return {
        "workers": 0,
        "bytes": old["bytes"],
        "bytes_per_position": old["bytes"] / old["positions"],
        "samples_per_s": samples / seconds,
        "positions_per_s": positions / seconds,
        "mb_per_s": shard_bytes / seconds / 1e6,
    }


def measure(
    shard_dir: Path,
    batch_size: int,
    workers: list[int],
    epochs: int,
    device: str = "cpu",
    map_files: bool = True,
) -> dict:
    manifest = load_manifest(shard_dir)
    files = [shard_dir / s["file"] for s in manifest["shards"]]
    # shards.gather=device: the loader alone (it reads in the training process), then with the
    # batches assembled on `device`
    settings = [(w, "host", None) for w in workers] + [(0, "device", on) for on in (None, device)]
    loaders, raw_reads = [], []
    for w, gather, on in settings:
        # the page-cache read of the same bytes, next to every loader run: this machine's rate
        # drifts between minutes, and the best of them is the limit
        raw_reads.append(raw_read_mb_per_s(files, passes=epochs))
        loaders.append(
            loader_rates(shard_dir, manifest, batch_size, w, epochs, gather, on, map_files)
        )
    raw_reads.append(raw_read_mb_per_s(files, passes=epochs))
    raw = max(raw_reads)
    baseline = format1_rates(shard_dir, manifest, batch_size, epochs)
    cold = cold_read_mb_per_s(files)
    parts = loader_parts(shard_dir, manifest, batch_size, epochs, map_files)
    # loaders that make batches (the plans-only row makes none)
    best_per_worker = max(
        entry["positions_per_s_per_worker"]
        for entry in loaders
        if entry["gather"] == "host" or entry["device"] is not None
    )
    return {
        "shards": str(shard_dir),
        "map_files": map_files,
        "batch_size": batch_size,
        "epochs": epochs,
        "bytes": manifest["bytes"],
        "positions": manifest["positions"],
        "bytes_per_position": manifest["bytes"] / manifest["positions"],
        "format1_bytes_per_position": baseline["bytes_per_position"],
        "bytes_per_position_vs_format1": manifest["bytes"] / baseline["bytes"],
        "raw_read_mb_per_s": raw,
        "raw_reads_mb_per_s": raw_reads,
        "cold_read_mb_per_s": cold,
        "loaders": loaders,
        "in_process_parts": parts,
        "format1_loader": baseline,
        "positions_per_s_per_worker_vs_format1": best_per_worker / baseline["positions_per_s"],
        "in_process_mb_per_s_vs_raw_read": next(
            (e["mb_per_s"] / raw for e in loaders if e["workers"] == 0), None
        ),
        "gather_device_loader_mb_per_s_vs_raw_read": next(
            e["mb_per_s"] / raw for e in loaders if e["gather"] == "device"
        ),
        "in_process_mb_per_s_vs_cold_read": next(
            (e["mb_per_s"] / cold for e in loaders if e["workers"] == 0 and cold), None
        ),
    }


def markdown(result: dict) -> list[str]:
    raw, cold = result["raw_read_mb_per_s"], result["cold_read_mb_per_s"]
    cold_text = (
        f"{cold:,.0f} MB/s from disk (page cache dropped)"
        if cold
        else "disk rate not measured (needs root)"
    )
    lines = [
        f"Loader only, batch {result['batch_size']}, {result['epochs']} epochs of "
        f"`{result['shards']}` ({'mapped' if result.get('map_files', True) else 'read'} by the "
        f"loader); raw read of the same files: {raw:,.0f} MB/s from the page cache "
        f"(the best of {len(result.get('raw_reads_mb_per_s', [raw]))} reads, one before each "
        f"loader run and one after them), {cold_text}:",
        "",
        "| loader | workers | samples/s | positions/s | MB/s | positions/s per worker | vs page-cache read | vs disk read | training thread, ms per batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str, workers: str, entry: dict, per_worker: float) -> str:
        versus_cold = f"{entry['mb_per_s'] / cold:.2f}" if cold else "-"
        main_thread = entry.get("main_thread_ms_per_batch")
        main_thread = f"{main_thread:.3f}" if main_thread is not None else "-"
        return (
            f"| {name} | {workers} | {entry['samples_per_s']:,.0f} | {entry['positions_per_s']:,.0f} | "
            f"{entry['mb_per_s']:,.1f} | {per_worker:,.0f} | {entry['mb_per_s'] / raw:.3f} | {versus_cold} | "
            f"{main_thread} |"
        )

    old = result["format1_loader"]
    lines.append(
        row(
            "format 1 (per-sample blobs, row-by-row collate)",
            "in process",
            old,
            old["positions_per_s"],
        )
    )
    for entry in result["loaders"]:
        if entry.get("gather", "host") == "host":
            name = "format 2 (columnar blocks)"
        elif entry.get("device") is None:
            name = "format 2, `shards.gather: device`: reading and planning only"
        else:
            name = f"format 2, `shards.gather: device`, batches made on {entry['device']}"
        workers = str(entry["workers"] or "in process")
        lines.append(row(name, workers, entry, entry["positions_per_s_per_worker"]))
    lines += [
        "",
        f"Bytes per target position: {result['bytes_per_position']:.1f} (format 1: "
        f"{result['format1_bytes_per_position']:.1f}, ratio {result['bytes_per_position_vs_format1']:.2f}); "
        "best positions/s per worker of a loader that makes batches vs format 1: "
        f"{result['positions_per_s_per_worker_vs_format1']:.1f}x.",
    ]
    parts = result["in_process_parts"]
    lines += [
        "",
        "In-process loader, each part alone (MB/s of shard bytes): reading and decoding the "
        f"shards one at a time {parts['read_decode_mb_per_s']:,.0f}, assembling batches from "
        f"decoded shards {parts['assemble_mb_per_s']:,.0f}.",
    ]
    return lines


def reshard(source: Path, output: Path, shard_size: int, block_size: int | None = None) -> None:
    """The samples of `source`, in the same order, rewritten in shards of `shard_size` samples
    (one group each, as trainer/precompute.py cuts them; blocks of `block_size`, by default one
    block per shard as precompute writes them): to measure what the per-shard costs weigh at
    another shard size, and what joining several blocks costs."""
    manifest = load_manifest(source)
    output.mkdir(parents=True)
    block_size = block_size or shard_size
    sink = ShardSink(output, max_blocks=2**31, max_bytes=2**62, block_size=block_size)
    samples = (
        sample for shard in manifest["shards"] for sample in iter_samples(source / shard["file"])
    )
    sizes = []
    while len(sizes) * shard_size < manifest["examples"]:
        sink.start_group(len(sizes))
        sizes.append(min(shard_size, manifest["examples"] - len(sizes) * shard_size))
        for _ in range(sizes[-1]):
            sink.put(*next(samples))
        sink.end_group()
    sink.close()
    shards = [shard for g, n in enumerate(sizes) for shard in verify_group(output, g, n)["shards"]]
    bytes_ = sum(shard["bytes"] for shard in shards)
    resharded = {
        **manifest,
        "shards": shards,
        "bytes": bytes_,
        "examples_per_group": shard_size,
        "block_size": block_size,
    }
    write_json_atomic(output / MANIFEST, resharded)
    (output / manifest["item_table"]).symlink_to((source / manifest["item_table"]).resolve())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", required=True, type=Path, help="a format-2 shard folder")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch (default 64)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1, 2], help="loader settings (default 0 1 2)"
    )
    parser.add_argument(
        "--epochs", type=int, default=10, help="epochs drawn per setting (default 10)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where shards.gather=device assembles the batches in its last row (default cpu)",
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        help="measure the same samples rewritten (in a temporary folder) in shards of this many",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        help="with --shard-size: samples per block (default: one block per shard, as precompute)",
    )
    parser.add_argument(
        "--copy-files",
        action="store_true",
        help="read each shard file into memory instead of mapping it (shards.map_files: false)",
    )
    parser.add_argument("--output", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        shards = args.shards
        if args.shard_size:
            shards = Path(scratch) / f"{args.shards.name}-{args.shard_size}"
            reshard(args.shards, shards, args.shard_size, args.block_size)
        result = measure(
            shards, args.batch_size, args.workers, args.epochs, args.device, not args.copy_files
        )
    if args.shard_size:
        blocks = f" in blocks of {args.block_size}" if args.block_size else ""
        result.update(shards=f"{args.shards} rewritten in shards of {args.shard_size}{blocks}")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
