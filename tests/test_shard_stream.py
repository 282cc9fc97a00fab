"""The shard stream on hand-made shards: equal batches per rank, exact resume, damaged shards."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from recdistill.trainer.data.shard_stream import TeacherShardStream, make_loader
from recdistill.trainer.data.shards import ShardError, ShardSink, verify_group


def write_shards(out, group_sizes: list[int], k: int = 4) -> dict:
    """Fake teacher shards: sample i of the whole set has item_ids [i + 1] and target i + 2."""
    out.mkdir()
    sink = ShardSink(out, max_count=10_000, max_bytes=10**9)
    index = 0
    for group, size in enumerate(group_sizes):
        sink.start_group(group)
        for _ in range(size):
            sink.put(
                f"s{index:06d}",
                {
                    "item_ids": np.asarray([index + 1], np.int32),
                    "targets": np.asarray([index + 2], np.int32),
                    "topk_ids": np.arange(1, k + 1, dtype=np.int32)[None],
                    "topk_scores": np.zeros((1, k), np.float16),
                    "confidence": np.zeros((1, k), np.float16),
                    "logsumexp": np.zeros((1, 1), np.float32),
                    "target_logprob": np.zeros(1, np.float32),
                    "user_row": np.asarray([index], np.int64),
                },
            )
            index += 1
        sink.end_group()
    sink.close()
    shards = [s for g, size in enumerate(group_sizes) for s in verify_group(out, g, size)["shards"]]
    return {"mode": "sequence", "shards": shards, "examples": index}


def epoch_batches(
    out, manifest, rank, world=2, workers=2, start=0, on_error="raise", batch_size=16
):
    stream = TeacherShardStream(
        out, manifest, rank, world, batch_size, workers, seed=3, on_error=on_error
    )
    stream.set_position(1, start)
    items = list(make_loader(stream))
    return (
        stream,
        [item for item in items if "item_ids" in item],
        [r for item in items for r in item.get("skipped_shards", [])],
    )


def test_uneven_shards_give_every_rank_the_same_batches(tmp_path):
    manifest = write_shards(tmp_path / "s", [100, 100, 100, 60, 30])
    counts = []
    seen = set()
    for rank in (0, 1):
        stream, batches, _ = epoch_batches(tmp_path / "s", manifest, rank)
        counts.append(len(batches))
        assert len(batches) == stream.steps_per_epoch() > 0
        for batch in batches:
            ids = batch["item_ids"][:, 0].tolist()
            assert not seen & set(ids)  # no sample twice in an epoch, across ranks and workers
            seen |= set(ids)
    assert counts[0] == counts[1]


def test_exact_resume_continues_with_the_same_batches(tmp_path):
    manifest = write_shards(tmp_path / "s", [70, 50, 90, 40])
    _, full, _ = epoch_batches(tmp_path / "s", manifest, rank=1)
    for start in (1, 3, len(full) - 1):
        stream, resumed, _ = epoch_batches(tmp_path / "s", manifest, rank=1, start=start)
        assert len(resumed) == len(full) - start
        for a, b in zip(resumed, full[start:]):
            assert a["item_ids"].equal(b["item_ids"])
        assert {p["worker"] for p in stream.worker_positions()} <= {0, 1}


def test_batches_carry_teacher_outputs_at_target_positions(tmp_path):
    manifest = write_shards(tmp_path / "s", [40, 40])
    _, batches, skipped = epoch_batches(tmp_path / "s", manifest, rank=0, workers=1)
    batch = batches[0]
    assert (batch["targets"][:, 0] == batch["item_ids"][:, 0] + 1).all()
    assert batch["teacher_topk_ids"].shape == (16, 1, 4) and skipped == []


def damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
        return
    with tarfile.open(path) as tar:  # flip a byte inside the third sample's payload
        member = [m for m in tar.getmembers() if m.isfile()][2]
    data[member.offset_data + member.size - 3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_shard_raises_with_its_name(tmp_path, how):
    manifest = write_shards(tmp_path / "s", [60, 60, 60, 60])
    victim = tmp_path / "s" / manifest["shards"][2]["file"]
    damage(victim, how)
    with pytest.raises(ShardError, match=victim.name):
        for rank in (0, 1):
            epoch_batches(tmp_path / "s", manifest, rank, workers=1)


def test_damaged_shard_skipped_is_counted_and_named(tmp_path):
    manifest = write_shards(tmp_path / "s", [60, 60, 60, 60])
    victim = tmp_path / "s" / manifest["shards"][2]["file"]
    damage(victim, "truncate")
    reports = []
    for rank in (0, 1):
        reports += epoch_batches(tmp_path / "s", manifest, rank, workers=1, on_error="skip")[2]
    assert len(reports) == 1 and victim.name in reports[0]


def test_too_few_shards_for_the_ranks_is_a_clear_error(tmp_path):
    manifest = write_shards(tmp_path / "s", [60])
    with pytest.raises(ShardError, match="1 shards for 2 ranks"):
        TeacherShardStream(tmp_path / "s", manifest, 0, 2, 16, 1, seed=0)


def test_resampled_mode_streams_batches_without_data_state(tmp_path):
    manifest = write_shards(tmp_path / "s", [50, 50, 50])
    stream = TeacherShardStream(
        tmp_path / "s", manifest, 0, 2, 8, 1, seed=0, mode="resampled", shuffle_buffer=20
    )
    assert stream.steps_per_epoch() == 150 // (8 * 2)
    batches = []
    for batch in make_loader(stream):  # an endless stream: the job stops it after its steps
        batches.append(batch)
        if len(batches) == 30:
            break
    ids = [int(i) for b in batches for i in b["item_ids"][:, 0]]
    # 240 samples of 150 exist: drawn with replacement there are repeats; each shard drawn brings
    # its 50 distinct samples
    assert len(ids) == 240 and 50 <= len(set(ids)) < 240
    assert all(1 <= i <= 150 for i in ids)
