"""Checks of a job's inputs that need no ranks and no model: run first by every job, and alone by
`--check` (before a launcher starts ranks, so an error is one line, not a launcher traceback).
Each raises a JobError naming the file, key or shard."""

from __future__ import annotations

import json
import re
from pathlib import Path

from recdistill.trainer.config import ConfigError
from recdistill.trainer.data.pipeline import STATS_FILE
from recdistill.trainer.errors import JobError


def choice(cfg: dict, key: str, allowed) -> None:
    """`key` (dotted) of `cfg` is one of `allowed`."""
    value = cfg
    for part in key.split("."):
        value = value[part]
    if value not in allowed:
        raise ConfigError(f"{key} {value!r}: use one of {', '.join(map(str, allowed))}")


def required(cfg: dict, key: str):
    value = cfg
    for part in key.split("."):
        value = value[part]
    if value in (None, ""):
        raise ConfigError(f"{key} is not set (in the config file or as {key}=...)")
    return value


BYTE_UNITS = {"kB": 10**3, "MB": 10**6, "GB": 10**9}


def size_in_bytes(value: str, key: str) -> int:
    """A size written as '10MB', '512kB' or '1.5GB' (decimal units) in bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(kB|MB|GB)\s*", str(value))
    if not match or float(match[1]) <= 0:
        raise ConfigError(f"{key} {value!r}: write a size such as 10MB (units: kB, MB, GB)")
    return int(float(match[1]) * BYTE_UNITS[match[2]])


def data_stats(data_dir, key: str = "data.dir") -> dict:
    """stats.json of a prepared data folder."""
    path = Path(data_dir) / STATS_FILE
    if not path.is_file():
        raise JobError(
            f"{key} {data_dir}: not a prepared data folder (no {STATS_FILE}); run trainer/prepare_data.py"
        )
    return json.loads(path.read_text())


def existing_file(path, key: str) -> Path:
    if path is None or not Path(path).is_file():
        raise JobError(f"{key} {path}: no such file")
    return Path(path)


def existing_dir(path, key: str) -> Path:
    if path is None or not Path(path).is_dir():
        raise JobError(f"{key} {path}: no such folder")
    return Path(path)


def fresh_or_resumed(output_dir, key: str, resume: bool) -> None:
    """A finished run is never overwritten; an unfinished one continues only with --resume."""
    output_dir = Path(output_dir)
    if (output_dir / "final").exists() and not resume:
        raise JobError(
            f"{key} {output_dir}: a finished run is there; choose another {key} (or pass --resume)"
        )
    if (output_dir / "checkpoints").is_dir() and any((output_dir / "checkpoints").iterdir()):
        if not resume:
            raise JobError(
                f"{key} {output_dir}: holds checkpoints of a run; pass --resume to continue it "
                f"or choose another {key}"
            )
