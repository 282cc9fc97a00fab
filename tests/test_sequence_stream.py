"""A student without a teacher (`shards.dir: null`): batches of the prepared sequences."""

from __future__ import annotations

import itertools
import subprocess
import sys

import torch

from recdistill.trainer.data.sequence_stream import SequenceStream
from recdistill.trainer.data.teacher_outputs import plan_examples

from .conftest import ROOT, accelerate_launch, read_jsonl

TRAIN = [list(range(10 * n + 1, 10 * n + 2 + n % 9)) for n in range(23)]  # 1..9 items each


def test_batches_hold_the_precompute_examples_split_across_ranks():
    plan = plan_examples(TRAIN, {"mode": "sequence", "max_len": 4})
    ranks = [SequenceStream(TRAIN, 4, rank, 2, 3, seed=7) for rank in (0, 1)]
    assert ranks[0].steps_per_epoch() == len(plan) // 6
    seen = []
    for stream in ranks:
        for batch in itertools.islice(iter(stream), stream.steps_per_epoch()):
            ids, targets, at = batch["item_ids"], batch["targets"], batch["target_positions"]
            for row in range(len(ids)):
                inputs = ids[row, : batch["lengths"][row]].tolist()
                mine = at // ids.shape[1] == row
                seen.append((inputs, targets[mine].tolist()))
                # every position is a target: the input's next item
                assert (at[mine] % ids.shape[1]).tolist() == list(range(len(inputs)))
    examples = [(inputs, targets) for _, _, inputs, targets in plan]
    assert len(seen) == len(ranks[0].epoch_order(0).ravel()) * 2  # the incomplete batch dropped
    assert all(example in examples for example in seen)
    assert len({str(example) for example in seen}) == len(seen)  # no example twice in an epoch


def test_resuming_at_a_position_gives_the_same_later_batches():
    stream = SequenceStream(TRAIN, 4, 0, 1, 4, seed=3)
    run = list(itertools.islice(iter(stream), 9))  # crosses into the second epoch (5 a epoch)
    stream.set_position(1, 2)
    resumed = list(itertools.islice(iter(stream), 2))
    for a, b in zip(run[7:9], resumed):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(run[0]["targets"], run[5]["targets"])  # epochs are reshuffled


def test_plain_student_trains_without_shards_and_refuses_teacher_terms(pipeline, tmp_path):
    args = [
        "--config",
        "configs/distill_demo.yaml",
        f"data.dir={pipeline['data']}",
        "shards.dir=null",
        f"train.output_dir={tmp_path / 'plain'}",
        "train.epochs=2",
    ]
    result = accelerate_launch("trainer/distill.py", args, 2)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [
        r["loss/total"] for r in read_jsonl(tmp_path / "plain/metrics.jsonl") if "loss/total" in r
    ]
    assert losses[-1] < losses[0]
    check = [*args[:-2], f"train.output_dir={tmp_path / 'x'}", "loss.ranking.enabled=true"]
    refused = subprocess.run(
        [sys.executable, "trainer/distill.py", "--check", *check],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "loss ranking read teacher outputs" in refused.stdout + refused.stderr
