"""Local launches: a timed-out job is ended with all its processes; jobs leave no /dev/shm."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from recdistill.launcher.local import deepspeed_command, run_job
from recdistill.trainer.deepspeed_host import deepspeed_shm_buffers, remove_stale_extension_locks

from .test_precompute import run_precompute


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


def test_timeout_ends_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "pid"
    # the job starts a child of its own (as a launcher starts ranks), then waits on it
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_job(["bash", "-c", script], timeout=2)
    assert time.monotonic() - started < 30
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the job's child outlived the timeout"


def test_each_launch_gets_its_own_port():
    ports = {deepspeed_command("x.py", 2, [])[4] for _ in range(5)}
    assert len(ports) > 1 and "29500" not in ports


def test_finished_deepspeed_job_leaves_no_shm_buffers(teacher_release, demo_data, tmp_path):
    before = set(deepspeed_shm_buffers())
    run_precompute(teacher_release, demo_data, tmp_path / "shards", 2)
    assert set(deepspeed_shm_buffers()) - before == set()


def test_stale_extension_lock_is_removed_and_a_fresh_one_kept(tmp_path, capsys):
    stale = tmp_path / "py311_cpu/deepspeed_shm_comm/lock"
    fresh = tmp_path / "py311_cpu/cpu_adam/lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    assert remove_stale_extension_locks(tmp_path, max_age_s=900) == [stale]
    assert not stale.exists() and fresh.exists()
    assert str(stale) in capsys.readouterr().err


def test_deepspeed_job_clears_a_stale_build_lock(teacher_release, demo_data, tmp_path, monkeypatch):
    """A build killed earlier left its lock: without clearing it, the job would wait forever."""
    extensions = tmp_path / "extensions"
    lock = extensions / "deepspeed_shm_comm/lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    result = run_precompute(teacher_release, demo_data, tmp_path / "shards", 2)
    assert "torch extension build lock" in result.stderr
    assert (extensions / "deepspeed_shm_comm/deepspeed_shm_comm.so").is_file()
