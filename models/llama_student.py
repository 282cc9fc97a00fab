"""Shallow LLaMA student (SLMRec): the teacher's architecture with n decoder layers.

Initialisation (`init`):
- "scratch": random;
- "teacher": copy the fine-tuned teacher release's item table, projections, final norm and the
  decoder layers listed in `teacher_layers` (e.g. the first n, or every k-th);
- "base": the first n layers of a base LLM checkpoint at a local path, as SLMRec does.
The student's blocks are its decoder layers; `block_states[i]` is the hidden state after layer i + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from recdistill.models.student_io import StudentOutput, save_student
from recdistill.models.teacher import (
    LLMRecTeacher,
    TeacherConfig,
    load_teacher_config,
)


@dataclass
class LlamaStudentConfig:
    num_items: int
    backbone: dict = field(default_factory=dict)  # HF LLaMA config dict (num_hidden_layers = n)
    item_dim: int = 64
    max_len: int = 50
    score_chunk_size: int = 8192


class LlamaStudent(nn.Module):
    architecture = "llama"

    def __init__(self, config: LlamaStudentConfig):
        super().__init__()
        self.config = config
        self.model = LLMRecTeacher(
            TeacherConfig(
                num_items=config.num_items,
                backbone=config.backbone,
                item_dim=config.item_dim,
                score_chunk_size=config.score_chunk_size,
            ),
            load_backbone_weights=False,
        )

    @property
    def item_embeddings(self) -> nn.Embedding:
        return self.model.item_embeddings

    def item_table(self) -> torch.Tensor:
        return self.model.item_table()

    def forward(
        self, item_ids: torch.Tensor, lengths: torch.Tensor, item_table: torch.Tensor | None = None
    ) -> StudentOutput:
        layers = tuple(range(1, self.config.backbone["num_hidden_layers"] + 1))
        out = self.model(item_ids, lengths, hidden_layers=layers, item_table=item_table)
        return StudentOutput(
            user_reps=out.user_reps, block_states=[out.hidden_states[i] for i in layers]
        )

    def save_pretrained(self, directory) -> None:
        save_student(self, directory)

    @classmethod
    def from_teacher(
        cls, teacher_dir: str | Path, teacher_layers: list[int], max_len: int = 50
    ) -> LlamaStudent:
        """Copy the teacher's non-layer weights and the chosen decoder layers (0-based). The
        release is loaded as the teacher loads it, LoRA adapters merged into the weights, so a
        LoRA teacher's layers arrive under the plain backbone's names."""
        teacher_config = load_teacher_config(Path(teacher_dir))
        backbone = dict(teacher_config.backbone, num_hidden_layers=len(teacher_layers))
        student = cls(
            LlamaStudentConfig(
                num_items=teacher_config.num_items,
                backbone=backbone,
                item_dim=teacher_config.item_dim,
                max_len=max_len,
                score_chunk_size=teacher_config.score_chunk_size,
            )
        )
        state = LLMRecTeacher.from_pretrained(Path(teacher_dir), merge_lora=True).state_dict()
        renamed = {}
        for name, tensor in state.items():
            if ".layers." in name:
                prefix, rest = name.split(".layers.", 1)
                index, tail = rest.split(".", 1)
                if int(index) in teacher_layers:
                    renamed[f"{prefix}.layers.{teacher_layers.index(int(index))}.{tail}"] = tensor
            else:
                renamed[name] = tensor
        student.model.load_state_dict(renamed)
        return student

    @classmethod
    def from_base(
        cls, base_path: str, num_layers: int, num_items: int, item_dim: int = 64, max_len: int = 50
    ) -> LlamaStudent:
        """The first `num_layers` decoder layers of a local base LLM checkpoint (SLMRec's init)."""
        from transformers import AutoConfig, AutoModel

        backbone = AutoConfig.from_pretrained(base_path, local_files_only=True).to_dict()
        backbone["num_hidden_layers"] = num_layers
        student = cls(
            LlamaStudentConfig(
                num_items=num_items, backbone=backbone, item_dim=item_dim, max_len=max_len
            )
        )
        base = AutoModel.from_pretrained(base_path, local_files_only=True)
        base_state = {
            k: v
            for k, v in base.state_dict().items()
            if not k.startswith("layers.") or int(k.split(".")[1]) < num_layers
        }
        student.model.backbone.load_state_dict(base_state)
        return student
