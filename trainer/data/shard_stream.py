"""Streaming teacher shards into student batches: webdataset readers, split by rank and worker.

The loader is NOT passed through `accelerator.prepare()` (that would re-split the stream or
funnel it through rank 0): each rank reads only its own shards, and each DataLoader worker only
its part of those.

Two modes:
- "exact": every epoch shuffles the shard order (seeded by epoch), deals shards to ranks and
  workers, and shuffles samples within each shard (seeded by epoch and shard; the shard is the
  shuffle buffer). Every worker yields the same number of batches, so every rank runs the same
  number of steps whatever the shard sizes, and batch j of a rank comes from worker j % W. The
  position in an epoch is therefore one number, the batches consumed; it maps to (shard,
  offset) per worker from the manifest's counts, which is how a resumed job continues exactly.
- "resampled": every worker draws shards with replacement forever (webdataset's
  ResampledShards) through a sample shuffle buffer; an epoch is a nominal number of steps.
  Restart-safe with no data state at all, but a resumed job sees a different stream.

Damaged shards raise ShardError naming the shard (on_error="raise"), or are skipped whole and
reported by a marker item `{"skipped_shards": [reason]}` in the stream, which the job counts and
logs (a skipped shard changes the data, so such an epoch no longer resumes exactly).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recdistill.trainer.data.shards import SAMPLE_EXT, ShardError, decode_sample

log = logging.getLogger(__name__)


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


def collate(samples: list[dict[str, np.ndarray]], mode: str) -> dict[str, torch.Tensor]:
    """Pad a list of decoded samples into [B, L, ...] tensors.

    Teacher outputs are laid out per input position: in sequence mode every position has a
    target, in prefix mode only the last one; positions without a target have target 0.
    """
    batch = len(samples)
    width = max(len(s["item_ids"]) for s in samples)
    k = samples[0]["topk_ids"].shape[1]
    n_temps = samples[0]["logsumexp"].shape[1]
    out = {
        "item_ids": torch.zeros(batch, width, dtype=torch.long),
        "lengths": torch.tensor([len(s["item_ids"]) for s in samples]),
        "targets": torch.zeros(batch, width, dtype=torch.long),
        "teacher_topk_ids": torch.zeros(batch, width, k, dtype=torch.long),
        "teacher_topk_scores": torch.zeros(batch, width, k),
        "teacher_confidence": torch.zeros(batch, width, k),
        "teacher_logsumexp": torch.zeros(batch, width, n_temps),
    }
    hidden_keys = sorted(
        key for key in samples[0] if key.startswith("hidden_") and key != "hidden_positions"
    )
    for row, sample in enumerate(samples):
        n = len(sample["item_ids"])
        out["item_ids"][row, :n] = torch.from_numpy(sample["item_ids"].astype(np.int64))
        at = slice(0, n) if mode == "sequence" else slice(n - 1, n)
        out["targets"][row, at] = torch.from_numpy(sample["targets"].astype(np.int64))
        out["teacher_topk_ids"][row, at] = torch.from_numpy(sample["topk_ids"].astype(np.int64))
        out["teacher_topk_scores"][row, at] = torch.from_numpy(
            sample["topk_scores"].astype(np.float32)
        )
        out["teacher_confidence"][row, at] = torch.from_numpy(
            sample["confidence"].astype(np.float32)
        )
        out["teacher_logsumexp"][row, at] = torch.from_numpy(sample["logsumexp"])
    if "hidden_positions" in samples[0]:
        # prefix mode stores the backbone's last position (after the prompt): the student's
        # matching position is its last item.
        positions = [
            s["hidden_positions"] if mode == "sequence" else [len(s["item_ids"]) - 1]
            for s in samples
        ]
        out["hidden_positions"] = torch.tensor(np.asarray(positions), dtype=torch.long)
        for key in hidden_keys:
            if key.endswith("_scale"):
                continue
            out[key] = torch.from_numpy(
                np.stack([unpack_hidden(s, key) for s in samples])
            )  # [B, P, H]
    return out


def unpack_hidden(sample: dict[str, np.ndarray], key: str) -> np.ndarray:
    """float32 hidden states from float16, bfloat16 bits (uint16) or int8 + per-row scale."""
    values = sample[key]
    if values.dtype == np.uint16:
        return torch.from_numpy(values.astype(np.int32) << 16).view(torch.float32).numpy()
    if values.dtype == np.int8:
        return values.astype(np.float32) * sample[f"{key}_scale"][:, None]
    return values.astype(np.float32)


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
    ):
        if mode not in ("exact", "resampled"):
            raise ValueError(f"shard mode {mode!r}: use exact or resampled")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error {on_error!r}: use raise or skip")
        self.shard_dir, self.manifest = Path(shard_dir), manifest
        self.rank, self.world, self.batch_size, self.workers = (
            rank,
            world,
            batch_size,
            max(1, workers),
        )
        self.seed, self.mode, self.shuffle_buffer, self.on_error = (
            seed,
            mode,
            shuffle_buffer,
            on_error,
        )
        self.sample_mode = manifest["mode"]
        self.epoch, self.start_batch = 0, 0
        if len(manifest["shards"]) < world:
            raise ShardError(
                f"{self.shard_dir}: {len(manifest['shards'])} shards for {world} ranks; write smaller shards"
            )

    def steps_per_epoch(self) -> int:
        if self.mode == "resampled":
            return self.manifest["examples"] // (self.batch_size * self.world)
        plan = plan_epoch(self.manifest["shards"], self.epoch, self.seed, self.world, self.workers)
        return batches_per_worker(plan, self.batch_size) * self.workers

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Read epoch `epoch` from its batch `start_batch` on (exact mode resumes there)."""
        self.epoch, self.start_batch = epoch, start_batch

    def worker_positions(self) -> list[dict]:
        """(shard, offset) where each worker of this rank resumes: recorded in checkpoints."""
        plan = plan_epoch(self.manifest["shards"], self.epoch, self.seed, self.world, self.workers)[
            self.rank
        ]
        positions = []
        for worker in range(self.workers):
            skip = self._skipped_batches(worker) * self.batch_size
            for shard in plan[worker]:
                if skip < shard["count"]:
                    positions.append({"worker": worker, "shard": shard["file"], "offset": skip})
                    break
                skip -= shard["count"]
        return positions

    def _skipped_batches(self, worker: int) -> int:
        return max(0, -(-(self.start_batch - worker) // self.workers))

    # ---- reading -----------------------------------------------------------------------------
    def _read_shard(self, shard: dict) -> list[dict[str, np.ndarray]]:
        """All samples of one shard, checked against the manifest's count."""
        url = str(self.shard_dir / shard["file"])
        samples = []
        try:
            for raw in wds.tarfile_to_samples(handler=wds.reraise_exception)(iter([{"url": url}])):
                if SAMPLE_EXT not in raw:
                    raise ShardError(
                        f"{url}: sample {raw.get('__key__')!r} has no .{SAMPLE_EXT} entry"
                    )
                samples.append(decode_sample(raw[SAMPLE_EXT], f"{url}:{raw['__key__']}"))
        except ShardError:
            raise
        except Exception as error:  # tar-level damage: truncation, bad headers
            raise ShardError(f"{url}: unreadable ({type(error).__name__}: {error})") from None
        if len(samples) != shard["count"]:
            raise ShardError(
                f"{url}: {len(samples)} samples, manifest says {shard['count']} (truncated?)"
            )
        return samples

    def _read_or_skip(self, shard: dict, skipped: list[str]) -> list | None:
        """The shard's samples, or None (reason appended to `skipped`) when on_error is skip."""
        try:
            return self._read_shard(shard)
        except ShardError as error:
            if self.on_error == "raise":
                raise
            log.warning("skipping shard: %s", error)
            skipped.append(str(error))
            return None

    def _exact_samples(self, worker: int, skipped: list[str]):
        plan = plan_epoch(self.manifest["shards"], self.epoch, self.seed, self.world, self.workers)
        skip = self._skipped_batches(worker) * self.batch_size
        for shard in plan[self.rank][worker]:
            if skip >= shard["count"]:
                skip -= shard["count"]
                continue
            samples = self._read_or_skip(shard, skipped)
            if samples is None:
                continue
            random.Random(f"{self.seed}-{self.epoch}-{shard['file']}").shuffle(samples)
            yield from samples[skip:]
            skip = 0

    def _resampled_samples(self, worker: int, skipped: list[str]):
        urls = [str(self.shard_dir / s["file"]) for s in self.manifest["shards"]]
        rng = random.Random()  # fresh entropy: a restart must not replay the same stream
        counts = {str(self.shard_dir / s["file"]): s for s in self.manifest["shards"]}
        shards = wds.ResampledShards(urls, seed=rng.randrange(2**31), deterministic=True)
        buffer: list = []
        for item in shards:
            samples = self._read_or_skip(counts[item["url"]], skipped)
            for sample in samples or []:
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))

    def __iter__(self):
        info = get_worker_info()
        # The DataLoader always starts its round-robin at worker 0; batch `start_batch` belongs to
        # logical worker start_batch % W, so loader worker i plays logical worker i + start_batch.
        worker = ((info.id if info is not None else 0) + self.start_batch) % self.workers
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(
                f"stream built for {self.workers} workers, DataLoader has {info.num_workers}"
            )
        skipped: list[str] = []
        if self.mode == "exact":
            samples = self._exact_samples(worker, skipped)
            limit = batches_per_worker(
                plan_epoch(
                    self.manifest["shards"], self.epoch, self.seed, self.world, self.workers
                ),
                self.batch_size,
            ) - self._skipped_batches(worker)
        else:
            samples = self._resampled_samples(worker, skipped)
            limit = None
        if limit is not None and limit <= 0:
            return
        batch: list = []
        made = 0
        for sample in samples:
            if skipped:  # a marker, not a batch: the job counts and logs it
                yield {"skipped_shards": list(skipped)}
                skipped.clear()
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch, self.sample_mode)
                batch, made = [], made + 1
                if limit is not None and made >= limit:
                    return
        if skipped:
            yield {"skipped_shards": list(skipped)}


def make_loader(stream: TeacherShardStream, pin_memory: bool = False) -> DataLoader:
    # batch_size=None: batches are made inside the workers, one worker per batch, in strict
    # round-robin order, which is what makes an exact-mode position one number.
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=stream.workers if stream.workers > 1 else 0,
        pin_memory=pin_memory,
        collate_fn=_as_is,
        # Its own generator: creating a DataLoader iterator draws a seed, and drawing it from the
        # global RNG would shift dropout and negative sampling after a resume.
        generator=torch.Generator().manual_seed(stream.seed),
    )


def _as_is(batch):
    return batch
