"""Teacher precompute under the deepspeed launcher: rank invariance, kill + resume, corruption."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from recdistill.models.teacher import LLMRecTeacher
from recdistill.trainer.data.shards import ShardError, iter_samples, load_manifest

from .conftest import ROOT, launch

CONFIG = "configs/precompute_demo.yaml"


def run_precompute(teacher, data, out, ranks, *overrides, check=True):
    args = [
        "--config",
        CONFIG,
        f"teacher={teacher}",
        f"data.dir={data}",
        f"output_dir={out}",
        "shard_size=150",
        "batch_size=40",
        "topk=20",
        *overrides,
    ]
    result = launch("trainer/precompute.py", args, ranks)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def all_samples(shard_dir: Path) -> dict[str, dict]:
    samples = {}
    for shard in load_manifest(shard_dir)["shards"]:
        for key, arrays in iter_samples(shard_dir / shard["file"]):
            assert key not in samples, f"duplicate {key}"
            samples[key] = arrays
    return samples


@pytest.fixture(scope="module")
def runs(teacher_release, demo_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("pre")
    layers = "hidden_layers=[2,4]"
    run_precompute(teacher_release, demo_data, base / "two", 2, layers)
    run_precompute(teacher_release, demo_data, base / "one", 1, layers)
    killed = run_precompute(
        teacher_release, demo_data, base / "killed", 2, layers, "kill_after_batches=6", check=False
    )
    assert killed.returncode != 0 and not (base / "killed/manifest.json").exists()
    run_precompute(teacher_release, demo_data, base / "killed", 2, layers)
    run_precompute(
        teacher_release,
        demo_data,
        base / "zero3",
        2,
        layers,
        "inference=zero3",
        "deepspeed_config=ds_configs/zero3_cpu.json",
    )
    return base


def test_two_ranks_and_one_process_write_the_same_samples(runs):
    two, one = all_samples(runs / "two"), all_samples(runs / "one")
    assert sorted(two) == sorted(one) and len(two) == load_manifest(runs / "two")["examples"]
    for key in two:
        assert np.array_equal(two[key]["topk_ids"], one[key]["topk_ids"]), key
        np.testing.assert_allclose(two[key]["topk_scores"], one[key]["topk_scores"], rtol=1e-3)
        np.testing.assert_allclose(two[key]["hidden_4"], one[key]["hidden_4"], rtol=1e-3, atol=1e-3)
    # block_size unset: each group is one block (the loader reads it without joining blocks)
    manifest = load_manifest(runs / "two")
    assert manifest["block_size"] == 150 and all(s["blocks"] == 1 for s in manifest["shards"])


def test_zero3_inference_writes_the_data_parallel_samples(runs):
    """ZeRO-3 partitions the teacher across the ranks (uneven batch counts padded): same outputs."""
    zero3, dp = all_samples(runs / "zero3"), all_samples(runs / "two")
    assert sorted(zero3) == sorted(dp)
    for key in dp:
        assert np.array_equal(zero3[key]["topk_ids"], dp[key]["topk_ids"]), key
        np.testing.assert_allclose(zero3[key]["logsumexp"], dp[key]["logsumexp"], rtol=1e-4)


def test_killed_and_resumed_run_has_exactly_the_uninterrupted_samples(runs):
    resumed, uninterrupted = all_samples(runs / "killed"), all_samples(runs / "two")
    assert sorted(resumed) == sorted(uninterrupted)
    assert not list((runs / "killed").glob("*.tmp"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "trainer/check_shards.py"), str(runs / "killed"), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_rerun_discards_half_written_group(runs, teacher_release, demo_data, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(runs / "two", out)
    manifest = load_manifest(out)
    victim = out / manifest["shards"][3]["file"]
    group = int(victim.name.split("-")[1])
    (out / f"group-{group:06d}.json").unlink()  # as if killed before the group's record was written
    victim.write_bytes(victim.read_bytes()[:5000])
    (out / "shard-999999-000.tar.tmp").write_bytes(b"junk")
    run_precompute(teacher_release, demo_data, out, 2, "hidden_layers=[2,4]")
    assert sorted(all_samples(out)) == sorted(all_samples(runs / "two"))
    assert load_manifest(out)["shards"] == manifest["shards"]  # byte-identical shards again


def test_groups_sized_by_bytes_hold_the_same_samples(runs, teacher_release, demo_data, tmp_path):
    """shard_size as a size: groups of about that many bytes, each sample exactly the bytes
    planned for it, the same samples as groups of a count."""
    import yaml

    from recdistill.models.teacher import load_teacher_config
    from recdistill.trainer.data.pipeline import load_sequences
    from recdistill.trainer.data.teacher_outputs import example_bytes, plan_examples

    out = tmp_path / "sized"
    run_precompute(
        teacher_release,
        demo_data,
        out,
        1,
        "hidden_layers=[2,4]",
        "shard_size=100kB",
        "min_shards=4",
    )
    manifest = load_manifest(out)
    sized, one = all_samples(out), all_samples(runs / "one")
    assert sorted(sized) == sorted(one)
    for key in one:  # other groups batch the teacher's forwards differently: float rounding
        assert np.array_equal(sized[key]["topk_ids"], one[key]["topk_ids"]), key
        np.testing.assert_allclose(sized[key]["logsumexp"], one[key]["logsumexp"], rtol=1e-4)
    cfg = yaml.safe_load((out / "precompute_config.yaml").read_text())
    config = load_teacher_config(teacher_release)
    examples = plan_examples(load_sequences(demo_data)[0]["train"]["items"], cfg["data"])
    for example in examples:  # the stored arrays plus an int32 count for each of 4 row groups
        stored = sum(value.nbytes for value in sized[example[0]].values()) + 4 * 4
        assert stored == example_bytes(example, cfg, config.num_items, config.hidden_size)
    per_group = manifest["examples_per_group"]
    assert per_group != 150 and manifest["block_size"] == per_group
    full = [s for s in manifest["shards"] if s["count"] == per_group]
    # on average about the size asked for, plus the block's and the tar's headers (the tar pads
    # to records of 10,240 bytes): about 10% more at 100 kB
    mean_bytes = sum(s["bytes"] for s in full) / len(full)
    assert len(full) >= 3 and 100_000 <= mean_bytes < 125_000, mean_bytes


@pytest.mark.parametrize("change", ["topk=10", "retrained"])
def test_rerun_with_another_teacher_or_setting_is_refused_and_keeps_the_shards(
    runs, teacher_release, demo_data, tmp_path, change
):
    """Finished groups are kept only for the teacher, data and settings that wrote them."""
    out = tmp_path / "shards"
    shutil.copytree(runs / "two", out)
    teacher, overrides = teacher_release, [change]
    if change == "retrained":  # the same config, other weights
        teacher = tmp_path / "teacher"
        shutil.copytree(teacher_release, teacher)
        model = LLMRecTeacher.from_pretrained(teacher)
        with torch.no_grad():
            next(model.parameters()).add_(0.01)
        model.save_pretrained(teacher)
        overrides = []
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    result = run_precompute(
        teacher, demo_data, out, 2, "hidden_layers=[2,4]", *overrides, check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    expected = "topk" if change == "topk=10" else "teacher_weights_sha256"
    assert "group-000000.json: written with another" in result.stderr and expected in result.stderr
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def test_samples_hold_what_the_teacher_computes(runs, teacher_release, demo_data):
    manifest = load_manifest(runs / "two")
    assert (
        manifest["topk"] == 20
        and manifest["temperatures"] == [1.0, 2.0]
        and manifest["hidden_layers"] == [2, 4]
    )
    samples = all_samples(runs / "two")
    key = sorted(samples)[5]
    sample = samples[key]
    teacher = LLMRecTeacher.from_pretrained(teacher_release)
    items = torch.tensor(sample["item_ids"], dtype=torch.long)[None]
    with torch.no_grad():
        out = teacher(items, torch.tensor([items.shape[1]]), hidden_layers=(4,))
        scores = out.user_reps[0] @ teacher.item_table().T
    scores[:, 0] = float("-inf")
    assert np.array_equal(sample["topk_ids"], scores.topk(20, dim=1).indices.numpy())
    logsumexp = torch.logsumexp(scores, dim=1).numpy()
    np.testing.assert_allclose(sample["logsumexp"][:, 0], logsumexp, rtol=1e-5)
    np.testing.assert_allclose(
        sample["logsumexp"][:, 1], torch.logsumexp(scores / 2, 1).numpy(), rtol=1e-5
    )
    target_scores = scores.gather(1, torch.tensor(sample["targets"], dtype=torch.long)[:, None])[
        :, 0
    ].numpy()
    np.testing.assert_allclose(
        sample["target_logprob"], target_scores - logsumexp, rtol=1e-4, atol=1e-4
    )
    assert "confidence" not in sample  # derived from logsumexp and the scores when read
    assert sample["topk_ids"].dtype == np.uint16  # 499 items: ids fit in 16 bits
    assert sample["hidden_positions"].tolist() == [len(sample["item_ids"]) - 1]
    np.testing.assert_allclose(
        sample["hidden_4"][0], out.hidden_states[4][0, -1].numpy(), rtol=2e-3, atol=2e-3
    )


def test_bytes_per_position_far_below_full_logits(runs):
    manifest = load_manifest(runs / "two")
    per_position = manifest["bytes"] / manifest["positions"]
    assert per_position < 0.5 * 4 * manifest["num_items"]


def corrupt_copy(src: Path, dst: Path, how: str) -> str:
    shutil.copytree(src, dst)
    shard = dst / load_manifest(dst)["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:  # flip one byte inside the last block's payload
        with tarfile.open(shard) as tar:
            member = [m for m in tar.getmembers() if m.isfile()][-1]
        data[member.offset_data + member.size // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    return shard.name


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_checker_names_the_bad_shard(runs, tmp_path, how):
    name = corrupt_copy(runs / "two", tmp_path / "bad", how)
    result = subprocess.run(
        [sys.executable, str(ROOT / "trainer/check_shards.py"), str(tmp_path / "bad"), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    bad_lines = [line for line in result.stderr.splitlines() if line.startswith("BAD")]
    assert bad_lines and all(name in line for line in bad_lines)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_sample_reader_names_the_bad_shard(runs, tmp_path, how):
    name = corrupt_copy(runs / "two", tmp_path / "bad", how)
    shard = tmp_path / "bad" / name
    with pytest.raises(ShardError, match=name):
        list(iter_samples(shard))


def test_zstd_blocks_hold_the_same_samples(runs, teacher_release, demo_data, tmp_path):
    out = tmp_path / "zstd"
    run_precompute(
        teacher_release,
        demo_data,
        out,
        2,
        "hidden_layers=[2,4]",
        "compression=zstd",
        "block_size=32",
    )
    manifest, plain = load_manifest(out), load_manifest(runs / "two")
    assert manifest["compression"] == "zstd" and manifest["bytes"] < plain["bytes"]
    assert all(shard["blocks"] == -(-shard["count"] // 32) for shard in manifest["shards"])
    zstd, two = all_samples(out), all_samples(runs / "two")
    assert sorted(zstd) == sorted(two)
    for key in two:
        for name, value in two[key].items():
            assert np.array_equal(zstd[key][name], value), (key, name)


def test_format1_folder_is_refused_then_converted_exactly(
    runs, teacher_release, demo_data, tmp_path
):
    from recdistill.trainer.data.legacy_shards import write_format1

    old = tmp_path / "v1"
    write_format1(runs / "two", old)
    with pytest.raises(ShardError, match="convert_shards.py"):
        load_manifest(old)
    # precompute into it refuses too, and leaves it as it was
    (old / "group-000000.json").write_text('{"group": 0, "shards": []}')
    before = sorted((p.name, p.stat().st_size) for p in old.iterdir())
    refused = run_precompute(teacher_release, demo_data, old, 1, "hidden_layers=[2,4]", check=False)
    assert refused.returncode != 0 and "format recdistill-teacher-shards/1" in refused.stderr
    assert sorted((p.name, p.stat().st_size) for p in old.iterdir()) == before
    result = subprocess.run(
        [sys.executable, str(ROOT / "trainer/convert_shards.py"), str(old), str(tmp_path / "v2")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    converted, direct = load_manifest(tmp_path / "v2"), load_manifest(runs / "two")
    # the same bytes as trainer/precompute.py writes for the same teacher outputs
    assert converted["shards"] == direct["shards"]
    assert '"bytes_per_position_after"' in result.stdout
    again = subprocess.run(
        [sys.executable, str(ROOT / "trainer/convert_shards.py"), str(old), str(tmp_path / "v2")],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "already exists" in again.stderr
