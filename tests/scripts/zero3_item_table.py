"""Build a teacher under DeepSpeed's zero.Init (as trainer/teacher.py does) and print the
gathered item table's and projections' statistics as JSON from rank 0, in fp32 and bf16;
tests/test_teacher_model.py checks them."""

import json

import deepspeed
import torch

from recdistill.models.teacher import LLMRecTeacher, TeacherConfig, import_backbone_modules
from recdistill.trainer.shutdown import exit_after_cleanup

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
    tied_projection_init=True,
)
import_backbone_modules(config)


def built_under_zero_init(ds_config: dict) -> dict:
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LLMRecTeacher(config)
    params = [
        model.item_embeddings.weight,
        model.item_in_proj.weight,
        model.user_out_proj.weight,
        model.item_in_proj.bias,
    ]
    with deepspeed.zero.GatheredParameters(params):
        table, w_in, w_out, bias = (p.detach().float().clone() for p in params)
    return {
        "dtype": str(params[1].dtype),
        "std": table[1:].std().item(),
        "padding_max": table[0].abs().max().item(),
        "tied_error": (w_out - w_in.T).abs().max().item(),
        # hidden 32 < item_dim 64: the rows of W_in [32, 64] are orthonormal
        "gram_error": (w_in @ w_in.T - torch.eye(32)).abs().max().item(),
        "bias_max": bias.abs().max().item(),
    }


zero3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
# bf16: zero.Init then makes every new tensor bf16, the projections' init included
stats = {
    "fp32": built_under_zero_init(zero3),
    "bf16": built_under_zero_init({**zero3, "bf16": {"enabled": True}}),
}
if torch.distributed.get_rank() == 0:
    print(json.dumps(stats))
# Both ranks reach teardown together: one rank destroying its group while the other is still
# printing aborted the process at exit once ("terminate called without an active exception").
torch.distributed.barrier()
torch.distributed.destroy_process_group()
# and skip the interpreter's teardown, which still aborted it once after all that (as the jobs do:
# trainer/shutdown.py)
exit_after_cleanup(0)
