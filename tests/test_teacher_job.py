"""The teacher job under the real `deepspeed` launcher: 2 CPU ranks, ZeRO-3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from recdistill.models.teacher import LLMRecTeacher
from recdistill.trainer.config import ConfigError
from recdistill.trainer.data.batches import prefix_batch
from recdistill.trainer.data.pipeline import load_sequences
from recdistill.trainer.metrics import finalize, metric_sums
from recdistill.trainer.teacher import build_examples, extra_sequences

from .conftest import ROOT, launch, losses_by_step

CONFIG = "configs/teacher_demo.yaml"


def run_teacher(data, out, ranks=2, *overrides, check=True):
    result = launch(
        "trainer/teacher.py",
        [
            "--config",
            CONFIG,
            f"data.dir={data}",
            f"train.output_dir={out}",
            "train.log_every=1",
            *overrides,
        ],
        ranks,
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(pipeline):
    """The demo teacher of the session's pipeline: 248 steps on 2 ranks, ZeRO-3."""
    return pipeline["teacher"]


def test_zero3_training_lowers_loss_and_beats_popularity(trained):
    losses = list(losses_by_step(trained / "metrics.jsonl").values())
    assert len(losses) == 248
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    metrics = json.loads((trained / "final/metrics.json").read_text())
    assert metrics["teacher"]["ndcg@10"] > metrics["popularity"]["ndcg@10"] + 0.05
    assert (trained / "tensorboard").is_dir() and (trained / "final/item_map.parquet").is_file()


def test_consolidated_checkpoint_reloads_without_deepspeed(trained, demo_data):
    """The HF-style release scores the test split exactly as the DeepSpeed engine did."""
    model = LLMRecTeacher.from_pretrained(trained / "final")
    splits, _ = load_sequences(demo_data)
    test = splits["test"]
    sums = None
    with torch.no_grad():
        for start in range(0, len(test), 256):
            rows = test[start : start + 256]
            batch = prefix_batch([h[-50:] for h in rows["history"]], rows["target"])
            ranks = model(
                batch["item_ids"], batch["lengths"], targets=batch["targets"], score="last"
            ).stats.target_ranks
            part = metric_sums(ranks)
            sums = part if sums is None else {k: sums[k] + v for k, v in part.items()}
    reloaded = finalize(sums)
    engine = json.loads((trained / "final/metrics.json").read_text())["teacher"]
    for key in ("hr@10", "ndcg@10", "mrr"):
        assert reloaded[key] == pytest.approx(engine[key], abs=1e-6)


def test_gpu_teacher_settings_train_on_cpu_ranks(demo_data, tmp_path):
    """The GPU scale's teacher settings (bench/configs/gpu.yaml: ds_configs/zero3_bf16.json with
    bf16, ZeRO-3 and torch's AdamW; tied projection init; input dropout) run on CPU ranks, so a
    GPU machine is not the first place they are tried. The release keeps the bf16 weights."""
    out = tmp_path / "bf16"
    run_teacher(
        demo_data,
        out,
        2,
        "train.deepspeed_config=ds_configs/zero3_bf16.json",
        "model.tied_projection_init=true",
        "model.input_dropout=0.2",
        "train.max_steps=12",
        "train.eval_every=100",
        "train.save_every=12",
    )
    losses = list(losses_by_step(out / "metrics.jsonl").values())
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    saved = load_file(str(out / "final/model.safetensors"))
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}
    metrics = json.loads((out / "final/metrics.json").read_text())
    assert 0.0 < metrics["teacher"]["ndcg@10"] <= 1.0


@pytest.fixture(scope="module")
def short_runs(demo_data, tmp_path_factory):
    """Three 12-step runs: 2 ranks, 1 process with the same global batch, and 2 ranks killed
    by SIGKILL after step 9 (checkpoint at step 6) then resumed."""
    base = tmp_path_factory.mktemp("short")
    common = ["train.max_steps=12", "train.save_every=6", "train.eval_every=100"]
    run_teacher(demo_data, base / "two", 2, *common)
    run_teacher(demo_data, base / "one", 1, *common, "train.grad_accum=2", "train.peak_tflops=0.5")
    killed = run_teacher(
        demo_data, base / "killed", 2, *common, "train.kill_at_step=9", check=False
    )
    assert killed.returncode != 0 and not (base / "killed/final").exists()
    run_teacher(demo_data, base / "killed", 2, *common, "--resume")
    return base


def test_two_ranks_match_one_process(short_runs):
    two = losses_by_step(short_runs / "two/metrics.jsonl")
    one = losses_by_step(short_runs / "one/metrics.jsonl")
    for step in range(1, 6):
        assert one[step] == pytest.approx(two[step], rel=1e-4), step
    assert two[5] < two[1]


def test_logged_model_flops_and_mfu(short_runs, demo_data):
    """TFLOP/s and samples/s of a window share its seconds: their ratio is the model FLOPs per
    sample, which must be what train_flops gives for the users of that step."""
    from recdistill.models.teacher import backbone_matmul_params, train_flops
    from recdistill.trainer.config import load_config
    from recdistill.trainer.data.batches import global_batch_order
    from recdistill.trainer.teacher import DEFAULTS, build_examples

    cfg = load_config(short_runs / "one/run_config.yaml", [], DEFAULTS)
    config = LLMRecTeacher.from_pretrained(short_runs / "one/final").config
    examples = build_examples(load_sequences(demo_data)[0], cfg["data"])
    global_batch = 32 * 2
    order = global_batch_order(len(examples), global_batch, seed=0, epoch=0)
    matmul_params = backbone_matmul_params(config)
    for run, devices in (("one", 1), ("two", 2)):
        records = [json.loads(line) for line in (short_runs / run / "metrics.jsonl").open()]
        by_step = {r["step"]: r for r in records if "tflops_per_device" in r}
        assert sorted(by_step) == list(range(1, 13))
        for step in (1, 7):
            lengths = [len(examples[i]) - 1 for i in order[step - 1]]
            per_sample = train_flops(config, lengths, matmul_params) / global_batch
            record = by_step[step]
            logged = record["tflops_per_device"] * devices * 1e12 / record["samples_per_s"]
            assert logged == pytest.approx(per_sample, rel=1e-9), (run, step)
            if run == "one":
                assert record["mfu"] == pytest.approx(record["tflops_per_device"] / 0.5)
            else:
                assert "mfu" not in record  # CPU: no peak to measure against


def test_killed_run_resumes_with_the_same_losses(short_runs):
    uninterrupted = losses_by_step(short_runs / "two/metrics.jsonl")
    resumed = losses_by_step(short_runs / "killed/metrics.jsonl")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(7, 13):  # the steps redone after the checkpoint of step 6
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6), step
    assert (short_runs / "killed/final/model.safetensors").is_file()


def prepare_lines(folder, lines: list[str]):
    """A prepared data folder from a `lines` log (user then items in order), nothing filtered."""
    folder.mkdir()
    (folder / "log.txt").write_text("\n".join(lines) + "\n")
    subprocess.run(
        [sys.executable, str(ROOT / "trainer/prepare_data.py"), "--format", "lines",
         "--input", str(folder / "log.txt"), "--output", str(folder / "data"),
         "--min-user-interactions", "1", "--min-item-interactions", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return folder / "data"


def test_extra_dirs_train_other_users_in_this_vocabulary(tmp_path):
    data = prepare_lines(tmp_path / "own", ["u1 a b c d", "u2 b c d e"])
    other = prepare_lines(tmp_path / "other", ["u8 a x b e", "u9 x y c", "u7 e d c b a"])
    splits, _ = load_sequences(data)
    ids = dict(zip(*[pq.read_table(data / "item_map.parquet")[c].to_pylist()
                     for c in ("raw_item", "item_id")]))  # fmt: skip
    a, b, c, d, e = (ids[raw] for raw in "abcde")
    # whole sequences (test history + target), x and y unknown here so dropped, u9 left with
    # one item: no training pair; users in the folder's order (sorted by raw id)
    assert extra_sequences(str(data), [str(other)]) == [[e, d, c, b, a], [a, b, e]]
    examples = build_examples(splits, {"max_len": 3, "mode": "sequence"}, [[e, d, c, b, a]])
    assert examples == [[a, b], [b, c], [d, c, b, a]]  # own train splits, then the last 4 of u7
    shared = prepare_lines(tmp_path / "shared", ["u2 a b c", "u3 c d e"])
    with pytest.raises(ConfigError, match="1 of its users are in data.dir too.*'u2'"):
        extra_sequences(str(data), [str(shared)])
    result = subprocess.run(
        [sys.executable, "trainer/teacher.py", "--config", CONFIG, "--check",
         f"data.dir={data}", f"train.output_dir={tmp_path / 'run'}",
         f"data.extra_dirs=[{other}]"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )  # fmt: skip
    assert result.returncode == 0 and "2 users (+2 from data.extra_dirs)" in result.stdout, (
        result.stdout + result.stderr
    )
