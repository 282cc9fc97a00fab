"""The shard stream on hand-made shards: equal batches per rank, exact resume, damaged shards."""

from __future__ import annotations

import io
import json
import tarfile
from unittest.mock import patch

import numpy as np
import pytest
import torch

from recdistill.trainer.data import shard_stream
from recdistill.trainer.data.shard_stream import (
    DeviceGather,
    GatherPlan,
    ShardColumns,
    TeacherShardStream,
    batch_to_device,
    gather,
    iter_batches,
    make_loader,
    pack_batches,
    to_batch,
    to_batches,
    unpack_batches,
)
from recdistill.trainer.data.shards import (
    Block,
    ReadBuffers,
    ShardError,
    ShardSink,
    block_checksum,
    check_shard,
    iter_tar_blocks,
    parse_ustar_header,
    read_blocks,
    verify_group,
)


def write_shards(out, group_sizes: list[int], k: int = 4, block_size: int = 16) -> dict:
    """Fake teacher shards: sample i of the whole set has item_ids [i + 1] and target i + 2,
    in blocks of `block_size` samples."""
    out.mkdir()
    sink = ShardSink(out, max_blocks=10_000, max_bytes=10**9, block_size=block_size)
    index = 0
    for group, size in enumerate(group_sizes):
        sink.start_group(group)
        for _ in range(size):
            sink.put(
                f"s{index:06d}",
                {
                    "item_ids": np.asarray([index + 1], np.uint16),
                    "targets": np.asarray([index + 2], np.uint16),
                    "topk_ids": np.arange(1, k + 1, dtype=np.uint16)[None],
                    "topk_scores": np.zeros((1, k), np.float16),
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
    items, batches = [], 0
    # the stream runs on into the next epoch by itself: take this epoch's batches
    # (asking for one item more would start the next epoch, whose reads run ahead of its batches)
    for item in iter_batches(make_loader(stream)):
        items.append(item)
        batches += "item_ids" in item
        if batches == stream.steps_per_epoch() - start:
            break
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


def group_bytes(manifest: dict, batches: int, batch_size: int = 16) -> float:
    """A GATHER_BYTES (or HANDOVER_BYTES) that makes the stream gather (or hand over) `batches`
    batches at once."""
    shards = manifest["shards"]
    return batches * batch_size * sum(s["bytes"] for s in shards) / manifest["examples"]


@pytest.mark.parametrize("gathered, group", [(1, 1), (2, 2), (16, 16), (1, 2), (2, 16)])
def test_exact_resume_continues_with_the_same_batches(tmp_path, monkeypatch, gathered, group):
    """Two loader workers hand over groups of batches in turn (group 2: two rounds, the last of
    single batches; 16: one group per worker per epoch), each group made of one or more gathers;
    resumed at any batch, the rank gets exactly the batches the uninterrupted epoch has from
    there, and each item that crossed from a worker was one group."""
    manifest = write_shards(tmp_path / "s", [70, 50, 90, 40, 60, 60])
    monkeypatch.setattr(shard_stream, "GATHER_BYTES", group_bytes(manifest, gathered))
    monkeypatch.setattr(shard_stream, "HANDOVER_BYTES", group_bytes(manifest, group))
    handed_over = []
    monkeypatch.setattr(
        shard_stream,
        "unpack_batches",
        lambda packed, device: (
            handed_over.append(len(packed.layouts)) or unpack_batches(packed, device)
        ),
    )
    stream, full, _ = epoch_batches(tmp_path / "s", manifest, rank=1)
    assert (stream.gather_batches, stream.group_batches) == (gathered, group)
    assert len(full) == stream.steps_per_epoch() == 6
    assert handed_over == {1: [1] * 6, 2: [2, 2, 1, 1], 16: [3, 3]}[group]
    for start in range(1, len(full)):
        stream, resumed, _ = epoch_batches(tmp_path / "s", manifest, rank=1, start=start)
        assert len(resumed) == len(full) - start
        for a, b in zip(resumed, full[start:]):
            assert a["item_ids"].equal(b["item_ids"])
        assert {p["worker"] for p in stream.worker_positions()} <= {0, 1}


def test_batches_carry_teacher_outputs_at_target_positions(tmp_path):
    manifest = write_shards(tmp_path / "s", [40, 40])
    _, batches, skipped = epoch_batches(tmp_path / "s", manifest, rank=0, workers=1)
    batch = batches[0]
    assert (batch["targets"].long() == batch["item_ids"][:, 0].long() + 1).all()
    assert batch["target_positions"].tolist() == list(range(16))  # [B, L] = [16, 1]
    assert batch["teacher_topk_ids"].shape == (16, 4) and skipped == []


def damage(path, how):
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
    if how == "truncate":  # cut inside the last block (the tail of a tar is only padding)
        path.write_bytes(bytes(data[: members[-1].offset_data + members[-1].size // 2]))
        return
    if how == "truncate_header":  # cut inside the last block's tar header
        path.write_bytes(bytes(data[: members[-1].offset + 100]))
        return
    member = members[2]  # flip a byte inside the third block's payload
    data[member.offset_data + member.size - 3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "truncate_header", "flip", "empty"])
@pytest.mark.parametrize("map_files", [True, False])
def test_damaged_shard_raises_with_its_name(tmp_path, how, map_files):
    manifest = write_shards(tmp_path / "s", [60, 60, 60, 60])
    victim = tmp_path / "s" / manifest["shards"][2]["file"]
    if how == "empty":  # a file of no bytes cannot be mapped: it is read, and named
        victim.write_bytes(b"")
    else:
        damage(victim, how)
    stream = TeacherShardStream(tmp_path / "s", manifest, 0, 1, 16, 0, seed=3, map_files=map_files)
    with pytest.raises(ShardError, match=victim.name):
        stream.read_shard(manifest["shards"][2])
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
    # the damaged shard's rank still makes the planned batches, from its other shards
    for rank in (0, 1):
        stream, batches, _ = epoch_batches(
            tmp_path / "s", manifest, rank, workers=1, on_error="skip"
        )
        assert len(batches) == stream.steps_per_epoch()


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
    for batch in iter_batches(
        make_loader(stream)
    ):  # an endless stream: the job stops it after its steps
        batches.append(batch)
        if len(batches) == 30:
            break
    ids = [int(i) for b in batches for i in b["item_ids"][:, 0]]
    # 240 samples of 150 exist: drawn with replacement there are repeats; each shard drawn brings
    # its 50 distinct samples
    assert len(ids) == 240 and 50 <= len(set(ids)) < 240
    assert all(1 <= i <= 150 for i in ids)


def test_to_batch_gathers_ragged_samples_hand_worked():
    # two samples: items [5, 6, 7] (targets at all 3 positions, hidden at positions 1 and 2)
    # and [9] (one target, one hidden position); bf16 hidden states travel as uint16 bits
    hidden = np.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)
    ragged = {
        "counts_items": np.asarray([3, 1]),
        "counts_targets": np.asarray([3, 1]),
        "counts_hidden": np.asarray([2, 1]),
        "item_ids": np.asarray([5, 6, 7, 9], np.uint16),
        "targets": np.asarray([6, 7, 8, 10], np.uint16),
        "topk_ids": np.arange(8, dtype=np.uint16).reshape(4, 2),
        "topk_scores": np.zeros((4, 2), np.float16),
        "logsumexp": np.zeros((4, 1), np.float32),
        "target_logprob": np.zeros(4, np.float32),
        "hidden_positions": np.asarray([1, 2, 0], np.int32),
        "hidden_3": (hidden.view(np.uint32) >> 16).astype(np.uint16),
    }
    batch = to_batch(ragged, "sequence")
    assert batch["item_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["target_positions"].tolist() == [0, 1, 2, 3]  # flat index into [2 x 3]
    assert batch["hidden_positions"].tolist() == [[1, 2], [0, 0]]
    assert batch["hidden_mask"].tolist() == [[True, True], [True, False]]
    assert batch["hidden_3"][1].tolist() == [[5.0, 6.0], [0.0, 0.0]]
    # hidden states stay in their stored half precision on the host, float32 on the device
    assert batch["hidden_3"].dtype == torch.bfloat16
    on_device = batch_to_device(batch, "cpu")
    assert on_device["hidden_3"].dtype == torch.float32
    assert on_device["hidden_3"][0].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert on_device["teacher_topk_scores"].dtype == torch.float32
    # every sample with the same number of hidden rows (the usual case: reshaped, not scattered)
    even = dict(
        ragged, counts_hidden=np.asarray([1, 1]), hidden_positions=np.asarray([7, 7], np.int32)
    )
    even["hidden_3"] = ragged["hidden_3"][1:]
    # (sequence mode: the stored positions; prefix mode: each sample's last item)
    for mode, positions in (("sequence", [[7], [7]]), ("prefix", [[2], [0]])):
        got = to_batch(even, mode)
        assert got["hidden_mask"].tolist() == [[True], [True]], mode
        assert got["hidden_3"].float().tolist() == [[[3.0, 4.0]], [[5.0, 6.0]]], mode
        assert got["hidden_positions"].tolist() == positions, mode
    # prefix mode: the one target of each sample sits at its last item
    prefix = dict(ragged, counts_targets=np.asarray([1, 1]), targets=np.asarray([8, 10]))
    for key in ("topk_ids", "topk_scores", "logsumexp", "target_logprob"):
        prefix[key] = ragged[key][:2]
    assert to_batch(prefix, "prefix")["target_positions"].tolist() == [2, 3]
    # on the device every integer is int64, uint16 ids above 32767 included
    wide = batch_to_device({"ids": torch.tensor([3, 40000, 65535], dtype=torch.uint16)}, "cpu")
    assert wide["ids"].dtype == torch.int64 and wide["ids"].tolist() == [3, 40000, 65535]
    # what crosses from a loader worker: a group of batches in one buffer, unpacked into the
    # same tensors
    group = [batch, to_batch(prefix, "prefix")]
    unpacked = unpack_batches(pack_batches(group))
    assert len(unpacked) == 2
    for got, sent in zip(unpacked, group):
        assert got.keys() == sent.keys()
        assert all(got[k].equal(sent[k]) and got[k].dtype == sent[k].dtype for k in sent)
    # bound for a device, the group is moved whole before it is unpacked: every field arrives
    # there (the meta device stands in for a GPU), in its dtype and shape, with no per-field copy
    moved = []
    original_to = torch.Tensor.to
    with patch.object(
        torch.Tensor, "to", lambda t, *a, **k: moved.append(t.dtype) or original_to(t, *a, **k)
    ):
        on_device = list(iter_batches([pack_batches(group)], "meta"))
    assert moved == [torch.uint8]
    for got, sent in zip(on_device, group):
        assert got.keys() == sent.keys()
        for k in sent:
            assert got[k].device.type == "meta", k
            assert (got[k].dtype, got[k].shape) == (sent[k].dtype, sent[k].shape), k


def random_ragged(rng, samples: int, mode: str, even_hidden: bool) -> dict[str, np.ndarray]:
    """A ragged set as `gather` makes it: items of 1-6, targets at every item (sequence) or the
    last (prefix), 1 hidden row each or 0-3."""
    items = rng.integers(1, 7, samples)
    targets = items if mode == "sequence" else np.ones(samples, np.int64)
    hidden = np.ones(samples, np.int64) if even_hidden else rng.integers(0, 4, samples)
    hidden[0] = max(hidden[0], 1)
    m = int(targets.sum())
    return {
        "counts_items": items,
        "counts_targets": targets,
        "counts_hidden": hidden,
        "item_ids": rng.integers(1, 500, int(items.sum())).astype(np.uint16),
        "targets": rng.integers(1, 500, m).astype(np.uint16),
        "topk_ids": rng.integers(1, 500, (m, 3)).astype(np.uint16),
        "topk_scores": rng.normal(size=(m, 3)).astype(np.float16),
        "logsumexp": rng.normal(size=(m, 2)).astype(np.float32),
        "target_logprob": rng.normal(size=m).astype(np.float32),
        "hidden_positions": rng.integers(0, 6, int(hidden.sum())).astype(np.int32),
        "hidden_2": rng.normal(size=(int(hidden.sum()), 4)).astype(np.float16),
    }


def ragged_slice(ragged: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Samples start..stop of a ragged set, field by field."""
    groups = {"items": ("item_ids",), "hidden": ("hidden_positions", "hidden_2")}
    out = {}
    for group in ("items", "targets", "hidden"):
        counts = ragged[f"counts_{group}"]
        lo, hi = int(counts[:start].sum()), int(counts[:stop].sum())
        out[f"counts_{group}"] = counts[start:stop]
        names = groups.get(
            group, ("targets", "topk_ids", "topk_scores", "logsumexp", "target_logprob")
        )
        out.update({name: ragged[name][lo:hi] for name in names})
    return out


@pytest.mark.parametrize("mode", ["sequence", "prefix"])
@pytest.mark.parametrize("even_hidden", [True, False])
def test_batches_split_at_once_equal_batches_made_one_by_one(mode, even_hidden):
    ragged = random_ragged(np.random.default_rng(0), 12, mode, even_hidden)
    together = to_batches(ragged, 4, mode)
    assert len(together) == 3
    for b, batch in enumerate(together):
        alone = to_batch(ragged_slice(ragged, 4 * b, 4 * b + 4), mode)
        assert batch.keys() == alone.keys()
        for key in alone:
            assert batch[key].dtype == alone[key].dtype, key
            assert batch[key].equal(alone[key]), (b, key)
    with pytest.raises(ValueError, match="not batches of 5"):
        to_batches(ragged, 5, mode)


def test_gathering_several_batches_at_once_changes_no_batch(tmp_path, monkeypatch):
    manifest = write_shards(tmp_path / "s", [70, 50, 90, 40])
    runs = {}
    for gather_batches in (1, 3, 8):
        monkeypatch.setattr(shard_stream, "GATHER_BYTES", group_bytes(manifest, gather_batches))
        _, batches, _ = epoch_batches(tmp_path / "s", manifest, rank=1, workers=0, start=1)
        runs[gather_batches] = [b["item_ids"] for b in batches]
    # one loader worker handing over groups of several gathers: the same batches again
    monkeypatch.setattr(shard_stream, "GATHER_BYTES", group_bytes(manifest, 2))
    monkeypatch.setattr(shard_stream, "HANDOVER_BYTES", group_bytes(manifest, 5))
    stream, batches, _ = epoch_batches(tmp_path / "s", manifest, rank=1, workers=1, start=1)
    assert (stream.gather_batches, stream.group_batches) == (2, 5)
    runs["worker"] = [b["item_ids"] for b in batches]
    assert len(runs[1]) == len(runs[8]) == len(runs["worker"]) > 3
    for gather_batches in (3, 8, "worker"):
        assert all(a.equal(b) for a, b in zip(runs[1], runs[gather_batches]))


def test_sample_orders_drawn_ahead_are_each_shards_own(tmp_path, monkeypatch):
    """Sample orders are drawn several shards ahead; each is still its own shard's (seeded by
    epoch and shard), so the batches are those of orders drawn one at a time."""
    manifest = write_shards(tmp_path / "s", [20 + 3 * i for i in range(11)])
    runs = {}
    for ahead in (1, 4, 16):
        monkeypatch.setattr(shard_stream, "SAMPLE_ORDERS_AHEAD", ahead)
        _, batches, _ = epoch_batches(tmp_path / "s", manifest, rank=0, workers=0, start=2)
        runs[ahead] = [b["item_ids"] for b in batches]
    stream = TeacherShardStream(tmp_path / "s", manifest, 0, 2, 16, 0, seed=3)
    in_order = np.concatenate(  # the rank's samples in epoch 1, each shard in its own order
        [
            stream.read_shard(shard).fields["item_ids"][stream._sample_order(shard, 1)]
            for shard in stream._plan(1)[0][0]
        ]
    )
    assert runs[1][0][:, 0].numpy().tolist() == in_order[32:48].tolist()  # batch 2 (start=2)
    assert len(runs[1]) == len(runs[16]) > 5
    for ahead in (4, 16):
        assert all(a.equal(b) for a, b in zip(runs[1], runs[ahead]))


def test_cached_shards_give_the_same_batches_without_reading_again(tmp_path):
    manifest = write_shards(tmp_path / "s", [40, 40, 40, 40])
    per_epoch = None
    runs = {}
    for cache_mb in (0, 100):
        stream = TeacherShardStream(
            tmp_path / "s", manifest, 0, 1, 16, 0, seed=3, cache_mb=cache_mb
        )
        per_epoch = stream.steps_per_epoch(0)
        batches = iter_batches(make_loader(stream))
        first = [next(batches)["item_ids"] for _ in range(per_epoch)]
        if cache_mb:  # every shard is in memory now: a second epoch needs no file
            for shard in manifest["shards"]:
                (tmp_path / "s" / shard["file"]).rename(tmp_path / f"{shard['file']}.away")
        second = [next(batches)["item_ids"] for _ in range(per_epoch)]
        runs[cache_mb] = first + second
        if cache_mb:
            for shard in manifest["shards"]:
                (tmp_path / f"{shard['file']}.away").rename(tmp_path / "s" / shard["file"])
    assert per_epoch and all(a.equal(b) for a, b in zip(runs[0], runs[100]))


def as_shard(ragged: dict[str, np.ndarray], hidden_dtype: str) -> ShardColumns:
    """A ragged set as one decoded shard, its hidden rows stored as float16, bfloat16 bits or
    int8 with a per-row scale."""
    arrays = dict(ragged)
    values = ragged["hidden_2"].astype(np.float32)
    if hidden_dtype == "bfloat16":
        arrays["hidden_2"] = (values.view(np.uint32) >> 16).astype(np.uint16)
    elif hidden_dtype == "int8":
        arrays["hidden_2"] = np.round(values * 40).clip(-127, 127).astype(np.int8)
        arrays["hidden_2_scale"] = np.full(len(values), 1 / 40, np.float32)
    return ShardColumns([Block(arrays, '{"keys": []}')])


@pytest.mark.parametrize("mode", ["sequence", "prefix"])
@pytest.mark.parametrize("even_hidden", [True, False])
@pytest.mark.parametrize("hidden_dtype", ["float16", "bfloat16", "int8"])
def test_batches_assembled_on_the_device_equal_the_loaders(mode, even_hidden, hidden_dtype):
    rng = np.random.default_rng(1)
    shards = [as_shard(random_ragged(rng, n, mode, even_hidden), hidden_dtype) for n in (9, 14, 7)]
    # 3 batches of 4 from three shards, samples drawn out of order, one shard in two runs
    parts = [
        (shards[0], np.asarray([8, 2, 5])),
        (shards[1], rng.permutation(14)[:5]),
        (shards[2], np.asarray([6])),
        (shards[0], np.asarray([0, 1, 7])),
    ]
    loader_made = to_batches(gather(parts), 4, mode)
    device_made = DeviceGather("cpu").batches(GatherPlan(parts, 4, mode))
    assert len(device_made) == len(loader_made) == 3
    for want, got in zip(loader_made, device_made):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            assert got[key].shape == want[key].shape, key
            bits = torch.int16 if want[key].dtype == torch.uint16 else want[key].dtype
            assert got[key].view(bits).equal(want[key].view(bits)), key


def test_device_gather_stream_resumes_exactly_with_the_loaders_batches(tmp_path):
    manifest = write_shards(tmp_path / "s", [70, 50, 90, 40])

    def epoch(gather_on: str, start: int) -> list[torch.Tensor]:
        stream = TeacherShardStream(tmp_path / "s", manifest, 1, 2, 16, 0, seed=3, gather=gather_on)
        stream.set_position(1, start)
        batches = iter_batches(make_loader(stream))
        return [next(batches)["item_ids"] for _ in range(stream.steps_per_epoch() - start)]

    host = epoch("host", 0)
    assert len(host) > 4 and all(a.equal(b) for a, b in zip(host, epoch("device", 0)))
    for start in (1, 3):  # a resumed epoch continues with the same batches
        assert all(a.equal(b) for a, b in zip(host[start:], epoch("device", start)))
    with pytest.raises(ValueError, match="shards.workers=0"):
        TeacherShardStream(tmp_path / "s", manifest, 0, 1, 16, 2, seed=3, gather="device")


def test_tar_entries_are_read_the_same_with_extended_headers(tmp_path):
    """The reader parses plain ustar headers itself; a tar with pax headers (a long entry name)
    or a directory entry, as another tool may write, reads through tarfile to the same blocks."""
    manifest = write_shards(tmp_path / "s", [40])
    original = tmp_path / "s" / manifest["shards"][0]["file"]
    blocks = [(name, bytes(blob)) for name, blob, _ in iter_tar_blocks(original)]
    assert len(blocks) == 3  # 40 samples in blocks of 16
    rewritten = tmp_path / "pax.tar"
    with tarfile.open(rewritten, "w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo("a-folder")
        folder.type = tarfile.DIRTYPE  # not a file: skipped
        tar.addfile(folder)
        for index, (name, blob) in enumerate(blocks):
            # the first block by its own name, then > 100 characters: a pax header
            info = tarfile.TarInfo(("x" * 120 if index else "") + name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    again = [(name, bytes(blob)) for name, blob, _ in iter_tar_blocks(rewritten)]
    assert [blob for _, blob in again] == [blob for _, blob in blocks]
    assert again[0][0] == blocks[0][0] and again[1][0] == "x" * 120 + blocks[1][0]


def test_tar_headers_read_as_tarfile_reads_them_and_damaged_headers_are_named(tmp_path):
    """The reader's own ustar parser agrees with tarfile on every header the writer makes; a
    flipped byte in a tar header (bad checksum) or a safetensors header whose shape does not fit
    its bytes (not covered by the block checksum) is an error naming the shard."""
    manifest = write_shards(tmp_path / "s", [40])
    path = tmp_path / "s" / manifest["shards"][0]["file"]
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    for member in members:
        header = data[member.offset : member.offset + tarfile.BLOCKSIZE]
        assert parse_ustar_header(header) == (member.name, member.size, member.isfile())

    flipped = bytearray(data)
    flipped[members[1].offset + 3] ^= 0x01  # inside the second entry's name
    path.write_bytes(bytes(flipped))
    with pytest.raises(ShardError, match=f"{path.name}.*checksum"):
        list(iter_tar_blocks(path))

    shape = b'"shape":[16]'  # a 16-sample block's per-sample column
    assert shape in data
    path.write_bytes(data.replace(shape, b'"shape":[15]', 1))
    with pytest.raises(ShardError, match=f"{path.name}.*does not fill"):
        read_blocks(path)


def test_block_checksum_is_read_without_the_key_list_and_damaged_metadata_is_named(tmp_path):
    """A block's checksum is read from the fixed place the writer puts it (the key list, which
    the loader never uses, is parsed on use); any other layout is parsed whole. A damaged
    checksum is a mismatch naming the shard; a damaged key list is named by check_shard."""
    manifest = write_shards(tmp_path / "s", [40])
    record = manifest["shards"][0]
    path = tmp_path / "s" / record["file"]
    blocks = read_blocks(path)
    assert [key for block in blocks for key in block.keys] == [f"s{i:06d}" for i in range(40)]
    for block in blocks:
        parsed = json.loads(block.meta)
        assert block_checksum(block.meta) == parsed["xxh3"]
        reordered = json.dumps({"keys": parsed["keys"], "xxh3": parsed["xxh3"]})
        assert block_checksum(reordered) == parsed["xxh3"]
    assert check_shard(path, record) == []

    data = path.read_bytes()
    digest = json.loads(blocks[0].meta)["xxh3"]
    other = digest[:5] + ("1" if digest[5] != "1" else "2") + digest[6:]
    path.write_bytes(data.replace(digest.encode(), other.encode(), 1))
    with pytest.raises(ShardError, match=f"{path.name}.*checksum mismatch"):
        read_blocks(path)

    keys = b'\\"keys\\": ['  # as escaped inside the safetensors header's JSON
    assert keys in data
    path.write_bytes(data.replace(keys, keys[:-1] + b"(", 1))
    assert len(read_blocks(path)) == len(blocks)  # the loader reads on: it needs no keys
    problems = [p for p in check_shard(path, record) if "keys cannot be decoded" in p]
    assert len(problems) == 1 and path.name in problems[0]


def test_read_buffers_are_reused_only_when_nothing_views_them(tmp_path):
    buffers = ReadBuffers(keep=2)
    first = buffers.get(100)
    view = first[:10]
    first_id = id(first)
    del first
    second = buffers.get(100)
    assert id(second) != first_id  # `view` still reads the first buffer
    del second, view
    assert id(buffers.get(100)) == first_id
    # a shard kept (its columns alive) is never overwritten by the shards read after it
    manifest = write_shards(tmp_path / "s", [40, 40, 40, 40])
    stream = TeacherShardStream(tmp_path / "s", manifest, 0, 1, 16, 0, seed=3, map_files=False)
    kept = stream.read_shard(manifest["shards"][0])
    copies = {key: values.copy() for key, values in kept.fields.items()}
    for _ in range(3):
        for shard in manifest["shards"][1:]:
            stream.read_shard(shard)
    assert all(np.array_equal(kept.fields[key], copies[key]) for key in copies)


def test_groups_sized_by_bytes_hand_worked():
    """example_bytes and group_size against a hand count (no hidden states, then float16 and int8
    hidden states), and the min_shards floor."""
    from recdistill.trainer.data.teacher_outputs import example_bytes, group_size

    cfg = {"topk": 10, "temperatures": [1.0], "hidden_layers": [], "data": {"mode": "sequence"}}
    example = ("u0", 0, [1, 2, 3, 4], [2, 3, 4, 5])
    # per target: id 2 + 10 ids of 2 + 10 float16 scores + log-sum-exp 4 + log p 4 = 50;
    # 4 item ids 8 + 4 targets 200 + user_row 8 + counts of 3 row groups 12 = 228
    assert example_bytes(example, cfg, num_items=100, hidden_size=8) == 228
    # 70,000 items: int32 ids, 4 + 10 * 6 + 8 = 72 a target: 16 + 288 + 8 + 12 = 324
    assert example_bytes(example, cfg, num_items=70_000, hidden_size=8) == 324
    hidden = {
        **cfg,
        "hidden_layers": [1, 2],
        "hidden_positions": [-1, -2],
        "hidden_dtype": "float16",
    }
    # 2 positions: 4 (position) + 2 layers x 8 x 2 bytes each, + the hidden counts 4
    assert example_bytes(example, hidden, 100, 8) == 228 + 2 * (4 + 32) + 4
    hidden["hidden_dtype"] = "int8"  # 8 bytes and a float32 scale a row and layer
    assert example_bytes(example, hidden, 100, 8) == 228 + 2 * (4 + 2 * 12) + 4
    examples = [example] * 1000
    assert group_size({**cfg, "shard_size": 150}, examples, 100, 8) == 150
    sized = {**cfg, "shard_size": "22.8kB", "min_shards": 1}
    assert group_size(sized, examples, 100, 8) == 100  # 22,800 / 228
    assert group_size({**sized, "min_shards": 20}, examples, 100, 8) == 50  # 1000 // 20
    assert group_size({**sized, "min_shards": 5000}, examples, 100, 8) == 1


def test_mapped_shards_give_the_copied_batches_and_never_write_the_file(tmp_path):
    """shards.map_files: the same batches as files read into memory; the columns are writable
    views of a private mapping, so writing into them leaves the file as it was."""
    import hashlib
    import mmap

    manifest = write_shards(tmp_path / "s", [40, 50, 60, 30], block_size=64)  # a block a shard

    def batches(map_files: bool) -> list[dict]:
        stream = TeacherShardStream(
            tmp_path / "s", manifest, 0, 1, 16, 0, seed=3, map_files=map_files
        )
        stream.set_position(1)
        items = iter_batches(make_loader(stream))
        return [next(items) for _ in range(2 * stream.steps_per_epoch())]  # two epochs

    for mapped, copied in zip(batches(True), batches(False), strict=True):
        assert mapped.keys() == copied.keys()
        assert all(torch.equal(mapped[key], copied[key]) for key in copied)

    def memory_of(array):  # the object at the bottom of a view's chain of buffers
        while getattr(array, "base", None) is not None or isinstance(array, memoryview):
            array = array.obj if isinstance(array, memoryview) else array.base
        return array

    stream = TeacherShardStream(tmp_path / "s", manifest, 0, 1, 16, 0, seed=3)
    path = tmp_path / "s" / manifest["shards"][1]["file"]
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    columns = stream.read_shard(manifest["shards"][1])
    scores = columns.fields["topk_scores"]
    assert isinstance(memory_of(scores), mmap.mmap) and scores.flags.writeable
    scores[:] = 7.0
    torch.from_numpy(columns.fields["targets"].view(np.int16)).fill_(3)
    del columns, scores, stream
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    unmapped = TeacherShardStream(tmp_path / "s", manifest, 0, 1, 16, 0, seed=3, map_files=False)
    assert not isinstance(
        memory_of(unmapped.read_shard(manifest["shards"][1]).fields["targets"]), mmap.mmap
    )


def test_shared_memory_warning_names_the_room_the_workers_need(tmp_path, monkeypatch):
    """Loader workers hold workers x (prefetch + 1) groups per rank in /dev/shm: less free room
    than that is said before the job starts (a worker that runs out dies with a bus error)."""
    manifest = write_shards(tmp_path / "s", [70, 50, 90, 40])
    monkeypatch.setattr(shard_stream, "GATHER_BYTES", group_bytes(manifest, 1))
    monkeypatch.setattr(shard_stream, "HANDOVER_BYTES", group_bytes(manifest, 2))
    stream = TeacherShardStream(tmp_path / "s", manifest, 0, 1, 16, 2, seed=0)
    needed = 4 * 2 * (3 + 1) * stream.group_bytes  # 4 ranks, 2 workers, prefetch 3
    assert stream.group_batches == 2 and needed > 0

    def free(megabytes):
        stats = type("Stats", (), {"f_bavail": int(megabytes * 1e6) // 4096, "f_frsize": 4096})
        monkeypatch.setattr(shard_stream.os, "statvfs", lambda path: stats)

    free(needed * 2 / 1e6)
    assert shard_stream.shared_memory_warning(stream, 3, 4) is None
    free(needed / 2 / 1e6)
    warning = shard_stream.shared_memory_warning(stream, 3, 4, "/dev/shm")
    assert warning.startswith("warning: /dev/shm has") and "bus error" in warning
    assert f"about {needed / 1e6:.0f} MB" in warning and "shards.prefetch 3" in warning
    in_process = TeacherShardStream(tmp_path / "s", manifest, 0, 1, 16, 0, seed=0)
    assert shard_stream.shared_memory_warning(in_process, 3, 4) is None  # no workers, no segments
