"""Students built from a config section, and the distilled release: the student's own files plus
what scoring needs of its distillation (the collaborative embedding changes the item table)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from recdistill.models import STUDENTS, LlamaStudent
from recdistill.models.distillation import LOSS_DEFAULTS, DistillationObjective
from recdistill.models.student_io import STUDENT_CONFIG_FILE, WEIGHTS_FILE


def load_student(directory: str | Path) -> nn.Module:
    """Any student from its folder: the architecture is read from the config."""
    directory = Path(directory)
    path = directory / STUDENT_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a student checkpoint")
    config = json.loads(path.read_text())
    config_class, model_class = STUDENTS[config.pop("architecture")]
    model = model_class(config_class(**config))
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.eval()


DISTILL_FILE = "distillation.json"


COLLABORATIVE_FILE = "collaborative_embedding.safetensors"


def build_student(student_cfg: dict, num_items: int, max_len: int):
    architecture = student_cfg["architecture"]
    if architecture not in STUDENTS:
        raise ValueError(
            f"student.architecture {architecture!r}: choose one of {', '.join(STUDENTS)}"
        )
    if architecture == "llama" and student_cfg["init"] == "teacher":
        return LlamaStudent.from_teacher(
            student_cfg["teacher_dir"], list(student_cfg["teacher_layers"]), max_len
        )
    if architecture == "llama" and student_cfg["init"] == "base":
        return LlamaStudent.from_base(
            student_cfg["base_path"], student_cfg["num_layers"], num_items, max_len=max_len
        )
    config_class, model_class = STUDENTS[architecture]
    return model_class(config_class(num_items=num_items, max_len=max_len, **student_cfg["options"]))


def block_dims(student) -> list[int]:
    """Width of each student block's output, read off one tiny forward."""
    with torch.no_grad():
        was_training = student.training
        out = student.eval()(torch.ones(1, 2, dtype=torch.long), torch.tensor([2]))
        student.train(was_training)
    return [state.shape[-1] for state in out.block_states]


def save_distilled(objective: DistillationObjective, directory: Path, cfg: dict) -> None:
    """The student's own files, plus what evaluation needs of the distillation (the collaborative
    embedding, which changes the item table)."""
    objective.student.save_pretrained(directory)
    if objective.collaborative is not None:
        save_file(
            {
                k: v.detach().cpu().contiguous()
                for k, v in objective.collaborative.state_dict().items()
            },
            str(directory / COLLABORATIVE_FILE),
        )
    (directory / DISTILL_FILE).write_text(json.dumps({"loss": cfg["loss"]}, indent=2) + "\n")


def load_distilled(directory: str | Path) -> DistillationObjective:
    """A student release ready to score (with its collaborative embedding when it has one)."""
    directory = Path(directory)
    student = load_student(directory)
    loss_cfg = (
        json.loads((directory / DISTILL_FILE).read_text())["loss"]
        if (directory / DISTILL_FILE).is_file()
        else LOSS_DEFAULTS
    )
    inference_cfg = {
        **LOSS_DEFAULTS,
        "chunk_size": loss_cfg.get("chunk_size", 8192),
        # Releases written before `fuse` existed scored with the fused table.
        "embedding": {"fuse": "input_and_scoring", **loss_cfg.get("embedding", {"enabled": False})},
    }
    teacher_table = None
    if inference_cfg["embedding"]["enabled"]:
        teacher_table = load_file(str(directory / COLLABORATIVE_FILE))["teacher_table"]
    objective = DistillationObjective(student, inference_cfg, None, teacher_table)
    if objective.collaborative is not None:
        objective.collaborative.load_state_dict(load_file(str(directory / COLLABORATIVE_FILE)))
    return objective.eval()
