"""Shared fixtures: the synthetic data of the demo, prepared once per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recdistill.launcher.demo import DEMO_DATA_ARGS
from recdistill.launcher.local import accelerate_command, deepspeed_command, run_job
from recdistill.trainer.deepspeed_host import deepspeed_shm_buffers

ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONUNBUFFERED"] = "1"  # a failed job's output arrives whole in the test report


@pytest.fixture(scope="session", autouse=True)
def remove_deepspeed_shm_buffers():
    """Jobs remove their DeepSpeed CPU all-reduce buffers when they finish; the tests that kill a
    job on purpose leave theirs (66 MB a rank in /dev/shm, which is memory). Remove those."""
    started = time.time()
    yield
    for path in deepspeed_shm_buffers():
        if path.stat().st_mtime >= started:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo's synthetic log (2000 users, 500 items, 60k events) as prepared sequences."""
    out = tmp_path_factory.mktemp("data") / "data"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "trainer/prepare_data.py"),
            *DEMO_DATA_ARGS,
            "--output",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


def launch(
    script: str, args: list[str], num_ranks: int, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run a job under the real `deepspeed` launcher on CPU ranks, as a user would."""
    command = deepspeed_command(str(ROOT / script), num_ranks, args)
    return run_job(command, {"DS_ACCELERATOR": "cpu"}, timeout=timeout, capture=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(path: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    return {r["step"]: r["loss"] for r in read_jsonl(path) if "loss" in r}


@pytest.fixture(scope="session")
def teacher_release(demo_data, tmp_path_factory) -> Path:
    """An (untrained) tiny teacher saved as a release folder, for jobs that only need one."""
    import shutil

    import torch

    from recdistill.models.teacher import LLMRecTeacher, TeacherConfig

    stats = json.loads((demo_data / "stats.json").read_text())
    backbone = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 16,
        "max_position_embeddings": 128,
    }
    torch.manual_seed(0)
    model = LLMRecTeacher(
        TeacherConfig(
            num_items=stats["items"], backbone=backbone, item_dim=16, score_chunk_size=128
        )
    )
    out = tmp_path_factory.mktemp("teacher_release") / "final"
    model.save_pretrained(out)
    shutil.copy(demo_data / "item_map.parquet", out / "item_map.parquet")
    (out / "metrics.json").write_text(json.dumps({"item_vocab_sha256": stats["item_vocab_sha256"]}))
    return out


def accelerate_launch(
    script: str, args: list[str], num_processes: int = 2, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run a job under the real `accelerate launch` with CPU processes, as a user would."""
    command = accelerate_command(str(ROOT / script), num_processes, args)
    return run_job(command, {"ACCELERATE_USE_CPU": "true"}, timeout=timeout, capture=True)


@pytest.fixture(scope="session")
def pipeline(demo_data, tmp_path_factory) -> dict[str, Path]:
    """The demo's teacher (2 ranks, ZeRO-3) and its shards, made once for every test that needs them."""
    base = tmp_path_factory.mktemp("pipeline")
    teacher = base / "teacher"
    result = launch(
        "trainer/teacher.py",
        [
            "--config",
            "configs/teacher_demo.yaml",
            f"data.dir={demo_data}",
            f"train.output_dir={teacher}",
            "train.log_every=1",
        ],
        2,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shards = base / "shards"
    result = launch(
        "trainer/precompute.py",
        [
            "--config",
            "configs/precompute_demo.yaml",
            f"teacher={teacher / 'final'}",
            f"data.dir={demo_data}",
            f"output_dir={shards}",
        ],
        2,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"data": demo_data, "teacher": teacher, "shards": shards}
