"""What every student shares: its output type and `save_pretrained` / `from_pretrained` files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

STUDENT_CONFIG_FILE = "student_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class StudentOutput:
    user_reps: torch.Tensor  # [B, L, d]: position t represents the user after items[: t + 1]
    block_states: list[torch.Tensor] = field(
        default_factory=list
    )  # after each block, [B, L, d_block]


def save_student(model: nn.Module, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"architecture": model.architecture, **asdict(model.config)}
    (directory / STUDENT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def embed(
    item_ids: torch.Tensor, item_embeddings: nn.Embedding, item_table: torch.Tensor | None
) -> torch.Tensor:
    """Input embeddings from the model's own table, or from a given one (DLLM2Rec's collaborative
    embedding distillation adds the projected teacher table to the student's)."""
    if item_table is None:
        return item_embeddings(item_ids)
    return nn.functional.embedding(item_ids, item_table, padding_idx=0)
