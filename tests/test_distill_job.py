"""The distillation job under the real `accelerate launch` (2 CPU processes) on real shards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT, accelerate_launch, launch, read_jsonl

CONFIG = "configs/distill_demo.yaml"
DLLM2REC = ["loss.ranking.enabled=true", "loss.embedding.enabled=true", "loss.embedding.weight=0.1"]
LOGIT_KL = ["loss.logits.enabled=true", "loss.logits.temperature=1.0", "loss.logits.weight=2.0"]


def run_distill(pipeline, out, *overrides, check=True, processes=2, shards=None):
    args = [
        "--config",
        CONFIG,
        f"data.dir={pipeline['data']}",
        f"shards.dir={shards or pipeline['shards']}",
        f"train.output_dir={out}",
        *overrides,
    ]
    result = accelerate_launch("trainer/distill.py", args, processes)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def evaluate_cli(pipeline, tmp_path, *args) -> tuple[dict, subprocess.CompletedProcess]:
    """trainer/evaluate.py on the pipeline's data: (its report's models, the process)."""
    output = tmp_path / "eval.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "trainer/evaluate.py"),
            "--data",
            str(pipeline["data"]),
            "--output",
            str(output),
            *args,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(output.read_text())["models"], result


def terms_by_step(out) -> dict[int, dict]:
    """Each logged window's mean terms, by its last step (a resumed run's later line wins)."""
    return {r["step"]: r["terms"] for r in read_jsonl(out / "metrics.jsonl") if "terms" in r}


def test_distilled_student_beats_plain_student(pipeline, tmp_path):
    run_distill(pipeline, tmp_path / "plain")
    run_distill(pipeline, tmp_path / "distilled", *DLLM2REC, *LOGIT_KL)
    plain = json.loads((tmp_path / "plain/final/metrics.json").read_text())["student"]
    distilled = json.loads((tmp_path / "distilled/final/metrics.json").read_text())["student"]
    assert distilled["ndcg@10"] > plain["ndcg@10"]
    steps = terms_by_step(tmp_path / "distilled")
    first, last = [steps[s] for s in sorted(steps)[:3]], [steps[s] for s in sorted(steps)[-3:]]
    for term in ("next_item", "ranking", "logits"):
        assert sum(t[term] for t in last) < sum(t[term] for t in first), term
    # the evaluation CLI scores the saved students (collaborative embedding included) the same way
    report, result = evaluate_cli(
        pipeline,
        tmp_path,
        "--student",
        str(tmp_path / "distilled/final"),
        "--teacher",
        str(pipeline["teacher"] / "final"),
        "--sampled",
    )
    assert report["distilled"]["full"]["ndcg@10"] == pytest.approx(distilled["ndcg@10"], abs=1e-6)
    assert report["distilled"]["speedup_vs_teacher"] > 0 and "| teacher |" in result.stdout
    # With fewer than 1000 items, SLMRec's 999 sampled negatives are every other item: the
    # sampled protocol must then give exactly the full-ranking numbers.
    sampled = report["distilled"]["sampled"]
    assert sampled["ndcg@10"] == pytest.approx(distilled["ndcg@10"], abs=1e-6)


def test_killed_run_resumes_exactly(pipeline, tmp_path):
    common = [
        "train.max_steps=40",
        "train.save_every=20",
        "train.eval_every=1000",
        "train.log_every=5",
        *DLLM2REC,
    ]
    run_distill(pipeline, tmp_path / "whole", *common)
    # the cut run assembles its batches on its device (gather=device): the same batches, so the
    # same numbers as the whole run's loader-made ones
    cut = [*common, "shards.gather=device"]
    killed = run_distill(pipeline, tmp_path / "cut", *cut, "train.kill_at_step=30", check=False)
    assert killed.returncode != 0 and not (tmp_path / "cut/final").exists()
    # resumed with other loader settings, the job says the rest of the epoch is other batches
    shutil.copytree(tmp_path / "cut", tmp_path / "other")
    other = run_distill(pipeline, tmp_path / "other", *common, "shards.workers=2", "--resume")
    assert "is not the batches the interrupted run would have drawn" in other.stderr
    assert "worker 1 shard-" in other.stderr  # this run's second reader, named
    resumed_run = run_distill(pipeline, tmp_path / "cut", *cut, "--resume")
    assert "is not the batches" not in resumed_run.stderr
    whole, resumed = terms_by_step(tmp_path / "whole"), terms_by_step(tmp_path / "cut")
    assert sorted(resumed) == list(range(5, 41, 5))  # one line per logging window
    for step in range(25, 41, 5):
        for term, value in whole[step].items():
            assert resumed[step][term] == pytest.approx(value, rel=1e-5), (step, term)


def test_uneven_shards_with_workers_do_not_hang(pipeline, tmp_path):
    shards = tmp_path / "uneven"
    result = launch(
        "trainer/precompute.py",
        [
            "--config",
            "configs/precompute_demo.yaml",
            f"teacher={pipeline['teacher'] / 'final'}",
            f"data.dir={pipeline['data']}",
            f"output_dir={shards}",
            "shard_size=300",
        ],
        2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts = sorted(
        s["count"] for s in json.loads((shards / "manifest.json").read_text())["shards"]
    )
    assert counts[0] < counts[-1] and len(counts) % 2 == 1  # 7 shards: uneven by size and by rank
    run_distill(
        pipeline,
        tmp_path / "run",
        "shards.workers=2",
        "train.epochs=2",
        "train.eval_exclude_history=true",
        "train.lr_schedule=constant",
        "train.warmup_steps=0",
        shards=shards,
    )
    metrics = json.loads((tmp_path / "run/final/metrics.json").read_text())
    assert metrics["steps"] > 0
    rates = [r["lr"] for r in read_jsonl(tmp_path / "run/metrics.jsonl") if "lr" in r]
    assert len(rates) > 2 and all(r == pytest.approx(2e-3) for r in rates), rates  # no decay
    # the learning curve is in metrics.jsonl, its best point the recorded best
    curve = [
        r["valid/ndcg@10"]
        for r in read_jsonl(tmp_path / "run/metrics.jsonl")
        if "valid/ndcg@10" in r
    ]
    assert curve and max(curve) == pytest.approx(metrics["best_valid_ndcg@10"])
    # The job ranked each user's whole history out; the evaluation CLI does the same with
    # --exclude-seen, and ranking every item gives lower numbers on the same model.
    for flag in (["--exclude-seen"], []):
        report, _ = evaluate_cli(
            pipeline, tmp_path, "--student", str(tmp_path / "run/final"), *flag
        )
        full = report["run"]["full"]
        if flag:
            assert full["ndcg@10"] == pytest.approx(metrics["student"]["ndcg@10"], abs=1e-6)
        else:
            assert full["ndcg@10"] < metrics["student"]["ndcg@10"]


def test_shards_of_another_vocabulary_are_refused(pipeline, tmp_path):
    other = tmp_path / "other"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "trainer/prepare_data.py"),
            "--format",
            "synthetic",
            "--users",
            "300",
            "--items",
            "60",
            "--events",
            "6000",
            "--output",
            str(other),
        ],
        check=True,
        capture_output=True,
    )
    result = accelerate_launch(
        "trainer/distill.py",
        [
            "--config",
            CONFIG,
            f"data.dir={other}",
            f"shards.dir={pipeline['shards']}",
            f"train.output_dir={tmp_path / 'x'}",
        ],
        1,
    )
    assert result.returncode != 0 and "another item vocabulary" in result.stderr
