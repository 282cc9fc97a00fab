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


def exit_after_cleanup(code: int) -> None:
    """Flush what Python buffers, then end the process with `code`, skipping interpreter teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe must not change the exit code
            pass
    os._exit(code)


def run_and_exit(main: Callable[[], int]) -> None:
    """A job's `__main__`: run `main`, report an error as Python would, clean up, then exit."""
    try:
        code = main()
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    remove_deepspeed_shm_buffer()
    exit_after_cleanup(code)
