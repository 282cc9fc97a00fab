"""What DeepSpeed leaves on a machine between jobs, and how the jobs keep it from piling up.

Two things, both found when a day of tests and benchmarks stopped every later DeepSpeed job:
- DeepSpeed's CPU all-reduce (the shm comm op, used when all ranks share one machine) puts a
  66 MB buffer per rank in /dev/shm and never removes it. /dev/shm is memory: the finished jobs'
  buffers filled it until the OOM killer ended processes. Each rank now removes its own
  buffer's name when its job ends, whatever the outcome (ranks still mapping it keep it).
- A process killed while it builds a torch C++ extension (the shm op on the first run, fused
  optimisers on GPUs) leaves the build folder's `lock` file behind, and torch then waits for it
  forever in every later job on the machine, printing nothing. Before initialising, each rank
  removes a lock older than any build takes, and says so.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# DeepSpeed's name (ops/csrc/cpu/comm/shm.cpp): <prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>
DEEPSPEED_SHM_PREFIX = "deepspeed_allreduce_buffer"
# Building the shm op takes about 80 s on 2 cores; GPU ops a few minutes. A lock older than this
# was left by a killed build. RECDISTILL_STALE_LOCK_S overrides it.
STALE_LOCK_AGE_S = 900


def deepspeed_shm_buffers(pattern: str = "*") -> list[Path]:
    """This user's DeepSpeed CPU all-reduce buffers in /dev/shm; `pattern` matches what follows
    the uid (`<MASTER_ADDR>_<MASTER_PORT>_<rank>`)."""
    return sorted(Path("/dev/shm").glob(f"{DEEPSPEED_SHM_PREFIX}_{os.getuid()}_{pattern}"))


def remove_deepspeed_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm, if it made one."""
    env = os.environ
    if not all(key in env for key in ("LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK")):
        return
    for buffer in deepspeed_shm_buffers(f"{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{env['RANK']}"):
        buffer.unlink(missing_ok=True)


def extension_build_root() -> Path:
    """Where torch builds C++ extensions (TORCH_EXTENSIONS_DIR or its default)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def remove_stale_extension_locks(
    root: Path | None = None, max_age_s: float | None = None
) -> list[Path]:
    """Remove the build locks under `root` older than `max_age_s`; returns them."""
    root = extension_build_root() if root is None else root
    if max_age_s is None:
        max_age_s = float(os.environ.get("RECDISTILL_STALE_LOCK_S", STALE_LOCK_AGE_S))
    removed = []
    # TORCH_EXTENSIONS_DIR/<op>/lock, or the default root's <python>_<device>/<op>/lock
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # another rank removed it, or its build finished
            continue
        if age > max_age_s:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            print(
                f"recdistill: removed {lock}, a torch extension build lock {age / 60:.0f} min old"
                " (left by a build that was killed; torch would wait for it forever)",
                file=sys.stderr,
                flush=True,
            )
    return removed


def init_distributed() -> None:
    """deepspeed.init_distributed, after clearing what killed jobs left that would hang it."""
    import deepspeed

    remove_stale_extension_locks()
    deepspeed.init_distributed()


def local_world_size() -> int:
    """Ranks on this machine: the deepspeed launcher says LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
