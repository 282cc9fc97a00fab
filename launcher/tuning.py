"""The loss-weight procedure the demo and the benchmark share: for each distillation variant, every
combination of its grid (configs/tuning/grid.yaml) trains once and the best validation NDCG@10 is kept.
Test metrics are never read. What carries over to a new log is this procedure, not the numbers it
chose on another one.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
GRID_FILE = ROOT / "configs" / "tuning" / "grid.yaml"


def load_grid(source: str | dict | None = None) -> dict:
    """{variant: {dotted key: [values, first the official code's]}}: a mapping as it is, a YAML
    file's `tune` section, or configs/tuning/grid.yaml when `source` is None."""
    if isinstance(source, dict):
        return source
    path = Path(source) if source else GRID_FILE
    if not path.is_absolute() and not path.is_file():
        path = ROOT / path
    return yaml.safe_load(path.read_text())["tune"]


def candidates(grid: dict, variant: str) -> list[list[str]]:
    """The override lists of a variant's grid: every combination of its keys' values (first value
    first); [] when the variant has no grid."""
    if not grid.get(variant):
        return []
    keys = list(grid[variant])
    return [
        [f"{key}={json.dumps(value)}" for key, value in zip(keys, values)]
        for values in itertools.product(*(grid[variant][key] for key in keys))
    ]


def choose(valid_ndcg: list[float]) -> int:
    """The candidate with the best validation NDCG@10 (the first of equals)."""
    return int(np.argmax(valid_ndcg))


def record(variant_candidates: list[list[str]], valid_ndcg: list[float], **extra) -> dict:
    """One variant's choice as the benchmark's tuning.json and the demo's tuning file keep it."""
    chosen = choose(valid_ndcg)
    return {
        "chosen": chosen,
        **extra,
        "candidates": [
            {"overrides": overrides, "valid_ndcg@10": value}
            for overrides, value in zip(variant_candidates, valid_ndcg)
        ],
    }
