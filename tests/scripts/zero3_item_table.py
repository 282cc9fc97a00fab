"""Build a teacher under DeepSpeed's zero.Init (as trainer/teacher.py does) and print the
gathered item table's statistics as JSON from rank 0; tests/test_teacher_model.py checks them."""

import json

import deepspeed
import torch

from recdistill.models.teacher import LLMRecTeacher, TeacherConfig, import_backbone_modules

deepspeed.init_distributed(dist_backend="gloo")
config = TeacherConfig(
    num_items=3000,
    backbone={
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 16,
        "max_position_embeddings": 32,
    },
    item_dim=64,
)
ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
import_backbone_modules(config)
with deepspeed.zero.Init(config_dict_or_path=ds_config):
    model = LLMRecTeacher(config)
weight = model.item_embeddings.weight
with deepspeed.zero.GatheredParameters([weight]):
    table = weight.detach().clone()
if torch.distributed.get_rank() == 0:
    print(json.dumps({"std": table[1:].std().item(), "padding_max": table[0].abs().max().item()}))
torch.distributed.destroy_process_group()
