"""Checkpoint-and-stop on request: the sbatch scripts' USR1 trap creates OUTPUT/STOP shortly
before the time limit; the training loops look for it after every step, checkpoint and exit, and
the script requeues the job, which resumes from that checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

STOP_FILE = "STOP"


def stop_requested(output_dir: Path, device) -> bool:
    """True on every rank once rank 0 sees OUTPUT/STOP (all ranks must stop at the same step)."""
    is_rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    flag = torch.tensor(
        [1 if is_rank0 and (Path(output_dir) / STOP_FILE).exists() else 0], device=device
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
