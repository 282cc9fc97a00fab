"""Shallow LLaMA student (SLMRec): the teacher's architecture with n decoder layers.

Initialisation (`init`):
- "scratch": random;
- "teacher": copy the fine-tuned teacher release's item table, projections, final norm and the
  decoder layers listed in `teacher_layers` (e.g. the first n, or every k-th), LoRA adapters
  merged; the student reads its input as the teacher does (sequence or prefix mode, the same
  prompt tokens);
- "base": the first n layers of a base LLM checkpoint at a local path, as SLMRec does.
The student's blocks are its decoder layers; `block_states[i]` is the hidden state after layer i + 1.

Outputs are in item positions, as every student's: `user_reps[:, t]` represents the user after
items[: t + 1]. In prefix mode only the position after the whole prompt predicts: it sits at each
user's last item (the other positions are zero), and so do the block states there, which are the
ones the teacher's stored hidden states (taken at its last backbone position) align with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from recdistill.models.student_io import StudentOutput, save_student
from recdistill.models.teacher import (
    WEIGHTS_FILE,
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
    item_feature_dim: int = 0  # the teacher's item feature projection, when it has one
    mode: str = "sequence"  # "sequence" | "prefix": as the teacher it was cut from
    prompt_prefix_ids: list[int] = field(default_factory=list)
    prompt_suffix_ids: list[int] = field(default_factory=list)


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
                item_feature_dim=config.item_feature_dim,
                mode=config.mode,
                prompt_prefix_ids=list(config.prompt_prefix_ids),
                prompt_suffix_ids=list(config.prompt_suffix_ids),
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
        hidden = [out.hidden_states[i] for i in layers]  # each [B, T, H]
        if self.config.mode == "sequence":
            return StudentOutput(user_reps=out.user_reps, block_states=hidden)
        # prefix mode: [B, T, H] backbone positions -> [B, L, H] item positions, the last item's
        # position taking the state after the whole prompt (the one that predicts)
        batch, max_len = item_ids.shape
        rows = torch.arange(batch, device=item_ids.device)
        at_last = (torch.arange(max_len, device=item_ids.device)[None, :] == lengths[:, None] - 1)[
            ..., None
        ]  # [B, L, 1]
        items = len(self.config.prompt_prefix_ids) + torch.arange(max_len, device=item_ids.device)
        last = self.model.last_positions(lengths)  # [B]
        user_reps = out.user_reps.expand(-1, max_len, -1) * at_last  # [B, L, d_item]
        block_states = [
            torch.where(at_last, states[rows, last][:, None, :], states[:, items])
            for states in hidden
        ]
        return StudentOutput(user_reps=user_reps, block_states=block_states)

    def save_pretrained(self, directory) -> None:
        save_student(self, directory)

    @classmethod
    def from_teacher(
        cls, teacher_dir: str | Path, teacher_layers: list[int], max_len: int = 50
    ) -> LlamaStudent:
        """Copy the teacher's non-layer weights and the chosen decoder layers (0-based), in the
        teacher's input mode with its prompt. Only the tensors the student keeps are read from
        the release (a 7B teacher is never built); a LoRA teacher's adapters are merged into
        the copied weights (W + alpha / r * B A, as peft's merge), so its layers arrive under
        the plain backbone's names."""
        teacher_dir = Path(teacher_dir)
        teacher_config = load_teacher_config(teacher_dir)
        if not teacher_layers or not all(
            0 <= layer < teacher_config.num_layers for layer in teacher_layers
        ):
            raise ValueError(
                f"student.teacher_layers {teacher_layers}: 0-based layers of the teacher's "
                f"{teacher_config.num_layers}"
            )
        backbone = dict(teacher_config.backbone, num_hidden_layers=len(teacher_layers))
        student = cls(
            LlamaStudentConfig(
                num_items=teacher_config.num_items,
                backbone=backbone,
                item_dim=teacher_config.item_dim,
                max_len=max_len,
                score_chunk_size=teacher_config.score_chunk_size,
                item_feature_dim=teacher_config.item_feature_dim,
                mode=teacher_config.mode,
                prompt_prefix_ids=list(teacher_config.prompt_prefix_ids),
                prompt_suffix_ids=list(teacher_config.prompt_suffix_ids),
            )
        )
        lora = teacher_config.lora
        with safe_open(str(teacher_dir / WEIGHTS_FILE), framework="pt") as weights:
            stored = set(weights.keys())
            state = {
                name: teacher_tensor(weights, stored, teacher_name(name, teacher_layers), lora)
                for name in student.model.state_dict()
            }
        missing = [name for name, tensor in state.items() if tensor is None]
        if missing:
            raise ValueError(f"{teacher_dir / WEIGHTS_FILE}: no teacher weights for {missing[:5]}")
        student.model.load_state_dict(state)
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


def teacher_name(student_name: str, teacher_layers: list[int]) -> str:
    """The teacher's name of a student weight (student layer j is teacher layer teacher_layers[j])."""
    if ".layers." not in student_name:
        return student_name
    prefix, rest = student_name.split(".layers.", 1)
    index, tail = rest.split(".", 1)
    return f"{prefix}.layers.{teacher_layers[int(index)]}.{tail}"


def teacher_tensor(weights, stored: set[str], name: str, lora) -> torch.Tensor | None:
    """A plain-backbone weight from the release: as stored, or (LoRA teacher) under peft's names,
    the adapter merged in; None when the release has neither."""
    if name in stored:
        return weights.get_tensor(name)
    if not name.startswith("backbone."):
        return None
    peft_name = "backbone.base_model.model." + name[len("backbone.") :]
    if peft_name in stored:
        return weights.get_tensor(peft_name)
    module, kind = peft_name.rsplit(".", 1)  # kind: weight | bias
    base = f"{module}.base_layer.{kind}"
    if base not in stored:
        return None
    tensor = weights.get_tensor(base)
    lora_a, lora_b = f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"
    if kind == "weight" and lora_a in stored:
        delta = weights.get_tensor(lora_b).float() @ weights.get_tensor(lora_a).float()
        tensor = (tensor.float() + delta * (lora.alpha / lora.r)).to(tensor.dtype)
    return tensor
