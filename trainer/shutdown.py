"""Ending a distributed job's process without interpreter teardown.

After a job has finished its work, closed its files and destroyed its process group, the
interpreter's own teardown can still abort the process: C++ objects of torch, Gloo and DeepSpeed
ops (thread pools, stores) are destroyed in an unspecified order while their threads may still
be joinable, which ends in "terminate called without an active exception" and SIGABRT. The job
then exits -6 although every output was written, the launcher kills the other ranks and Slurm
marks the job FAILED (seen once in CI under srun). Exiting with os._exit after flushing skips
that teardown; it is only used from `if __name__ == "__main__"`, never when `main` is called
in-process.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable

from recdistill.trainer.deepspeed_host import remove_deepspeed_shm_buffer
from recdistill.trainer.errors import JobError


def exit_after_cleanup(code: int) -> None:
    """Flush what Python buffers, then end the process with `code`, skipping interpreter teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe must not change the exit code
            pass
    os._exit(code)


def report_once(message: str) -> None:
    """Print on one rank only (global rank 0, or a process outside any launcher): every rank
    finds the same input error, and the user should read it once."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def run_and_exit(main: Callable[[], int]) -> None:
    """A job's `__main__`: run `main`; an input error (JobError, or SystemExit with a message)
    is one line `error: ...` and exit code 2, anything else a traceback and 1; clean up, exit."""
    try:
        code = main()
    except JobError as error:
        report_once(f"error: {error}")
        code = 2
    except SystemExit as stop:
        if isinstance(stop.code, str):
            report_once(stop.code if stop.code.startswith("error: ") else f"error: {stop.code}")
            code = 2
        else:
            code = 0 if stop.code is None else stop.code
    except BaseException:
        traceback.print_exc()
        code = 1
    remove_deepspeed_shm_buffer()
    exit_after_cleanup(code)
