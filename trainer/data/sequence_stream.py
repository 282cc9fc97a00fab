"""Batches of the prepared training sequences themselves, for a student trained without a teacher
(`shards.dir: null` in trainer/distill.py): the plain baseline, or the sequential recommender whose
item table a teacher starts from (SLMRec's and E4SRec's recipe).

The examples are the ones trainer/precompute.py stores (plan_examples: each user's last
max_len + 1 items, every position a target), so a plain student sees the same training data
with or without shards. The batch dict is the shard stream's (`to_batch`) minus teacher outputs:
item_ids [B, L], lengths [B], targets [M] and target_positions [M] (row-major over B x L).
Each epoch is a seeded permutation, split evenly across ranks with the incomplete last batch
dropped, so every rank runs the same number of steps and a position is one number (batches
consumed in the epoch), as in exact-mode shard streams.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset

from recdistill.trainer.data.batches import pad_right
from recdistill.trainer.data.teacher_outputs import plan_examples


class SequenceStream(IterableDataset):
    processes = 0  # read in the training process: the sequences are already in memory

    def __init__(
        self, train_items, max_len: int, rank: int, world: int, batch_size: int, seed: int
    ):
        plan = plan_examples(train_items, {"mode": "sequence", "max_len": max_len})
        self.inputs = [inputs for _, _, inputs, _ in plan]
        self.targets = [targets for _, _, _, targets in plan]
        self.rank, self.world, self.batch_size, self.seed = rank, world, batch_size, seed
        self.epoch, self.start_batch = 0, 0

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        return len(self.inputs) // (self.batch_size * self.world)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def worker_positions(self) -> list[dict]:
        return []  # no shards: the epoch and batch count are the whole position

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[steps, batch_size] example indices of this rank in `epoch`."""
        steps, size = self.steps_per_epoch(epoch), self.batch_size
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.inputs))
        return order[: steps * size * self.world].reshape(steps, self.world, size)[:, self.rank]

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        item_ids, lengths = pad_right([self.inputs[i] for i in indices])
        width = item_ids.shape[1]
        positions = [
            row * width + t for row, i in enumerate(indices) for t in range(len(self.inputs[i]))
        ]
        targets = [target for i in indices for target in self.targets[i]]
        return {
            "item_ids": item_ids,
            "lengths": lengths,
            "targets": torch.tensor(targets, dtype=torch.long),
            "target_positions": torch.tensor(positions, dtype=torch.long),
        }

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        while True:  # the job stops after its planned steps
            for indices in self.epoch_order(epoch)[start:]:
                yield self.batch(indices)
            epoch, start = epoch + 1, 0
