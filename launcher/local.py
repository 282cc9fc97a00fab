"""Launching jobs on this machine: the `deepspeed` / `accelerate launch` command lines, and
running a job so that a timeout, an error or Ctrl-C in the caller ends all of its ranks.

Used by the demo, the benchmarks and the tests. Two things make local launches reliable:
- every launch gets its own free rendezvous port (the launchers' default 29500 is shared by
  every job on the machine: a second job, or anything else listening there, makes ranks wait
  on the wrong store);
- a job runs in its own process session and is ended as a group: killing only the launcher
  leaves its ranks running, holding ports, memory and /dev/shm.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from recdistill.launcher.slurm import free_port

ROOT = Path(__file__).resolve().parents[1]
# Seconds between SIGTERM to a job's process group and SIGKILL.
TERMINATE_GRACE_S = 10


def deepspeed_command(
    script: str, num_ranks: int, args: list[str], port: int | None = None
) -> list[str]:
    """`deepspeed` with `num_ranks` local ranks (CPU ranks under DS_ACCELERATOR=cpu) on `port`
    (a free one when not given)."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    port = port or free_port()
    return [launcher, "--num_gpus", str(num_ranks), "--master_port", str(port), script, *args]


def accelerate_command(
    script: str, num_processes: int, args: list[str], port: int | None = None
) -> list[str]:
    """`accelerate launch` on one machine (CPU processes under ACCELERATE_USE_CPU=true) with its
    rendezvous on `port` (a free one when not given)."""
    launcher = str(Path(sys.executable).parent / "accelerate")
    processes = ["--multi_gpu"] if num_processes > 1 else []
    port = port or free_port()
    return [
        launcher,
        "launch",
        *processes,
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        script,
        *args,
    ]


def run_job(
    command: list[str],
    env: dict | None = None,
    timeout: float | None = None,
    capture: bool = False,
    output: IO | None = None,
) -> subprocess.CompletedProcess:
    """Run `command` from the repository root with `env` added to the environment.

    capture=True returns stdout and stderr as text; `output` (an open file) receives both
    together; otherwise they go to this process's terminal. On a timeout (TimeoutExpired), an
    error or KeyboardInterrupt in the caller the job's whole process group is ended first.
    """
    if capture:
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    elif output is not None:
        streams = {"stdout": output, "stderr": subprocess.STDOUT}
    else:
        streams = {}
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        text=True,
        start_new_session=True,
        **streams,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            end_process_group(process)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def end_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process's whole group; SIGKILL what is left after TERMINATE_GRACE_S seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + TERMINATE_GRACE_S
    while time.monotonic() < deadline:
        process.poll()  # reap the leader, so that only live members keep the group
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
