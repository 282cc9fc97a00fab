"""The teacher model on its own (no DeepSpeed): modes, padding, hidden states, files, LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from recdistill.models.teacher import (
    LLMRecTeacher,
    TeacherConfig,
    backbone_matmul_params,
    train_flops,
)
from recdistill.trainer.data.batches import pad_right, prefix_batch, sequence_batch
from recdistill.trainer.throughput import peak_tflops, throughput_record

from .conftest import launch

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 16,
    "max_position_embeddings": 64,
}


def tiny_teacher(**kwargs) -> LLMRecTeacher:
    torch.manual_seed(0)
    return LLMRecTeacher(
        TeacherConfig(num_items=40, backbone=TINY_LLAMA, item_dim=16, score_chunk_size=7, **kwargs)
    ).eval()


def test_sequence_mode_padding_does_not_change_outputs():
    model = tiny_teacher()
    seqs = [[3, 4, 5, 6, 7], [9, 10]]
    batch = sequence_batch(seqs)
    out = model(batch["item_ids"], batch["lengths"], hidden_layers=(1, 3))
    alone = model(*pad_right([seqs[1][:-1]]), hidden_layers=(1, 3))
    torch.testing.assert_close(out.user_reps[1, :1], alone.user_reps[0, :1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out.hidden_states[3][1, :1], alone.hidden_states[3][0, :1], atol=1e-5, rtol=1e-5
    )
    assert out.user_reps.shape == (2, 4, 16) and out.hidden_states[1].shape == (2, 4, 32)


def test_sequence_loss_is_mean_of_per_user_means():
    model = tiny_teacher()
    batch = sequence_batch([[3, 4, 5, 6, 7], [9, 10]])
    loss = model(**batch).loss
    first = model(**sequence_batch([[3, 4, 5, 6, 7]])).loss
    second = model(**sequence_batch([[9, 10]])).loss
    torch.testing.assert_close(loss, (first + second) / 2, atol=1e-5, rtol=1e-5)


def test_scores_last_position_ranks_agree_with_full_scores():
    model = tiny_teacher()
    ids, lengths = pad_right([[3, 4, 5], [9]])
    targets = torch.tensor([6, 11])
    out = model(ids, lengths, targets=targets, score="last", topk=5)
    reps = out.user_reps[torch.arange(2), lengths - 1]
    scores = reps @ model.item_table().T
    scores[:, 0] = float("-inf")
    assert torch.equal(out.stats.topk_ids, scores.topk(5, dim=1).indices)
    assert torch.equal(
        out.stats.target_ranks, (scores > scores.gather(1, targets[:, None])).sum(1).double()
    )


def test_prefix_mode_uses_prompt_and_last_position():
    model = tiny_teacher(mode="prefix", prompt_prefix_ids=[1, 2, 3], prompt_suffix_ids=[4, 5])
    ids, lengths = pad_right([[3, 4, 5], [9]])
    out = model(ids, lengths, targets=torch.tensor([6, 11]), hidden_layers=(3,))
    alone = model(*pad_right([[9]]), hidden_layers=(3,))
    assert out.user_reps.shape == (2, 1, 16) and torch.isfinite(out.loss)
    torch.testing.assert_close(out.user_reps[1], alone.user_reps[0], atol=1e-5, rtol=1e-5)
    # the prompt matters: another suffix gives another representation
    other = tiny_teacher(mode="prefix", prompt_prefix_ids=[1, 2, 3], prompt_suffix_ids=[7, 5])
    assert not torch.allclose(other(*pad_right([[9]])).user_reps, alone.user_reps)


def test_save_and_load_roundtrip(tmp_path):
    model = tiny_teacher()
    model.save_pretrained(tmp_path)
    loaded = LLMRecTeacher.from_pretrained(tmp_path)
    batch = sequence_batch([[3, 4, 5, 6, 7]])
    torch.testing.assert_close(loaded(**batch).loss, model(**batch).loss)


def test_lora_trains_only_adapters_and_merges_on_load(tmp_path):
    model = tiny_teacher(
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert not any("backbone" in n and "lora" not in n for n in trainable)
    with torch.no_grad():  # make the adapters non-zero so that merging is observable
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    model.save_pretrained(tmp_path)
    loaded = LLMRecTeacher.from_pretrained(tmp_path, merge_lora=True)
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    batch = sequence_batch([[3, 4, 5, 6, 7]])
    torch.testing.assert_close(loaded(**batch).loss, model(**batch).loss, atol=1e-5, rtol=1e-5)


def test_backbone_from_a_bf16_checkpoint_is_built_in_the_default_dtype(tmp_path):
    """transformers 5 builds a model in its config.json's dtype: a bf16 checkpoint gave a bf16
    backbone beside fp32 item layers, and the first matmul between them failed."""
    from transformers import AutoConfig, AutoModel

    backbone = AutoModel.from_config(AutoConfig.for_model(**TINY_LLAMA), dtype=torch.bfloat16)
    backbone.save_pretrained(tmp_path)
    config = TeacherConfig(
        num_items=20, backbone=TINY_LLAMA, backbone_path=str(tmp_path), item_dim=8
    )
    for model in (LLMRecTeacher(config), LLMRecTeacher(config, load_backbone_weights=False)):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert torch.isfinite(model(**sequence_batch([[3, 4, 5]])).loss)


def test_gradient_checkpointing_gives_same_gradients():
    batch = sequence_batch([[3, 4, 5, 6, 7], [9, 10, 11]])
    grads = []
    for checkpointing in (False, True):
        model = tiny_teacher(gradient_checkpointing=checkpointing).train()
        model(**batch).loss.backward()
        grads.append(model.item_in_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="sequence' or 'prefix"):
        TeacherConfig(num_items=3, backbone=TINY_LLAMA, mode="chat")


def test_pretrained_item_table_is_loaded_and_can_be_frozen(tmp_path):
    from safetensors.torch import save_file

    from recdistill.trainer.teacher import load_item_embeddings

    table = torch.randn(41, 16)
    save_file({"weight": table}, str(tmp_path / "items.safetensors"))
    model = tiny_teacher(freeze_item_embeddings=True)
    load_item_embeddings(model, str(tmp_path / "items.safetensors"))
    torch.testing.assert_close(model.item_embeddings.weight.data, table)
    assert not model.item_embeddings.weight.requires_grad
    save_file({"weight": torch.randn(5, 16)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="wrong.safetensors"):
        load_item_embeddings(model, str(tmp_path / "wrong.safetensors"))


def test_item_table_from_a_student_release(tmp_path):
    """E4SRec's teacher input: model.item_embeddings may name a trained student's release folder;
    the teacher starts from that student's own item table."""
    from recdistill.models.sasrec import SASRec, SASRecConfig
    from recdistill.trainer.teacher import load_item_embeddings

    torch.manual_seed(3)
    student = SASRec(SASRecConfig(num_items=40, hidden_size=16, num_blocks=1, max_len=8))
    student.save_pretrained(tmp_path / "sasrec")
    model = tiny_teacher()
    assert not torch.equal(model.item_embeddings.weight.data, student.item_table().detach())
    load_item_embeddings(model, str(tmp_path / "sasrec"))
    torch.testing.assert_close(model.item_embeddings.weight.data, student.item_table().detach())
    wide = SASRec(SASRecConfig(num_items=40, hidden_size=32, num_blocks=1, max_len=8))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="wide"):
        load_item_embeddings(model, str(tmp_path / "wide"))


def test_item_init_std_and_input_dropout():
    default, small = tiny_teacher(), tiny_teacher(item_init_std=0.02)
    default_table, small_table = default.item_table().detach(), small.item_table().detach()
    assert float(default_table[1:].std()) == pytest.approx(16**-0.5, rel=0.2)
    assert float(small_table[1:].std()) == pytest.approx(0.02, rel=0.2)
    assert small_table[0].abs().sum() == 0  # padding row

    model = tiny_teacher(input_dropout=0.5)
    batch = sequence_batch([[3, 4, 5, 6, 7], [9, 10]])
    evaluated = model(batch["item_ids"], batch["lengths"]).user_reps
    torch.testing.assert_close(evaluated, model(batch["item_ids"], batch["lengths"]).user_reps)
    model.train()  # dropped inputs in training only
    assert not torch.allclose(model(batch["item_ids"], batch["lengths"]).user_reps, evaluated)
    unchanged = tiny_teacher(input_dropout=0.0).train()(**batch).loss.item()
    assert unchanged == pytest.approx(tiny_teacher()(**batch).loss.item())


def test_item_table_initialised_under_zero3():
    """zero.Init partitions parameters as each module is built; an init applied afterwards is
    lost. The table must come out N(0, item_dim^-1/2) with a zero padding row under ZeRO-3 too,
    in fp32 and in bf16."""
    result = launch("tests/scripts/zero3_item_table.py", [], num_ranks=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    built = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    # bf16 (the GPU configs) too: there zero.Init makes every new tensor bf16, and the
    # orthogonal init of tied_projection_init has no bf16 kernel
    for precision, gram_tolerance in (("fp32", 1e-5), ("bf16", 2e-2)):
        stats = built[precision]
        assert stats["dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]
        assert abs(stats["std"] - 64**-0.5) < 0.1 * 64**-0.5, stats
        assert stats["padding_max"] == 0.0
        # tied_projection_init survives zero.Init too (set on rank 0, partitioned again)
        assert stats["tied_error"] == 0.0 and stats["bias_max"] == 0.0, stats
        assert stats["gram_error"] < gram_tolerance, stats


def test_tied_projection_init_maps_an_item_back_to_itself():
    model = tiny_teacher(tied_projection_init=True)  # hidden 32 >= item_dim 16
    w_in, w_out = model.item_in_proj.weight, model.user_out_proj.weight
    torch.testing.assert_close(w_out, w_in.T)
    table = model.item_table().detach()
    round_trip = model.user_out_proj(model.item_in_proj(table))  # orthonormal columns: identity
    torch.testing.assert_close(round_trip, table, atol=1e-5, rtol=1e-5)
    untied = tiny_teacher()
    assert not torch.allclose(untied.user_out_proj.weight, untied.item_in_proj.weight.T)


TINY_BACKBONES = {  # other families than LLaMA: "any Hugging Face causal LM"
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 32,
        "n_layer": 3,
        "n_head": 4,
        "n_positions": 64,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "qwen2": {**TINY_LLAMA, "model_type": "qwen2"},
    "mistral": {**TINY_LLAMA, "model_type": "mistral"},
}


@pytest.mark.parametrize("family", sorted(TINY_BACKBONES))
def test_other_backbone_families_train_pad_and_round_trip(family, tmp_path):
    torch.manual_seed(0)
    backbone = {**TINY_BACKBONES[family], "vocab_size": 16}
    model = LLMRecTeacher(TeacherConfig(num_items=40, backbone=backbone, item_dim=16))
    seqs = [[3, 4, 5, 6, 7], [9, 10]]
    batch = sequence_batch(seqs)
    model.eval()
    out = model(batch["item_ids"], batch["lengths"], hidden_layers=(1, 3))
    alone = model(*pad_right([seqs[1][:-1]]))
    torch.testing.assert_close(out.user_reps[1, :1], alone.user_reps[0, :1], atol=1e-5, rtol=1e-5)
    assert out.hidden_states[3].shape == (2, 4, 32)  # SLMRec aligns these with the student

    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = LLMRecTeacher.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(
        loaded(batch["item_ids"], batch["lengths"]).user_reps,
        model(batch["item_ids"], batch["lengths"]).user_reps,
    )


FLOP_CASES = {  # teacher settings -> a batch without padding
    "sequence": ({}, sequence_batch([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])),
    "prefix": (
        {"mode": "prefix", "prompt_prefix_ids": [1, 2, 3], "prompt_suffix_ids": [4, 5]},
        prefix_batch([[3, 4, 5, 6], [7, 8, 9, 10]], [11, 12]),
    ),
    "frozen table": (
        {"freeze_item_embeddings": True},
        sequence_batch([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]),
    ),
}


@pytest.mark.parametrize("case", sorted(FLOP_CASES))
def test_train_flops_equal_the_counted_matmuls(case):
    """The MFU numerator against torch's FLOP counter on a real forward + backward (eager
    attention computes the whole T x T scores, as the formula assumes)."""
    from torch.utils.flop_counter import FlopCounterMode

    settings, batch = FLOP_CASES[case]
    backbone = {**TINY_LLAMA, "attn_implementation": "eager"}
    config = TeacherConfig(num_items=40, backbone=backbone, item_dim=16, **settings)
    model = LLMRecTeacher(config).train()
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    lengths = batch["lengths"].tolist()
    assert backbone_matmul_params(config) == 3 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)
    expected = train_flops(config, lengths, backbone_matmul_params(config))
    # exact: a 41-item catalogue is one loss chunk, whose scores are not recomputed in backward
    assert counter.get_total_flops() == expected


def test_train_flops_of_lora_and_padding():
    batch = sequence_batch([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    backbone = {**TINY_LLAMA, "attn_implementation": "eager"}
    config = TeacherConfig(num_items=40, backbone=backbone, item_dim=16, lora={"r": 2})
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        LLMRecTeacher(config).train()(**batch).loss.backward()
    matmul_params = backbone_matmul_params(config)
    counted = counter.get_total_flops()
    # Frozen backbone weights: no weight gradients; the rank-2 adapters (not counted) add ~3%.
    assert train_flops(config, [5, 5], matmul_params) == pytest.approx(counted, rel=0.04)
    # Pads are no model FLOPs: a padded batch counts what its users would alone.
    assert train_flops(config, [5, 2], matmul_params) == train_flops(
        config, [5], matmul_params
    ) + train_flops(config, [2], matmul_params)


def test_backbone_matmul_params_of_gpt2_leave_out_position_table():
    config = TeacherConfig(num_items=40, backbone={**TINY_BACKBONES["gpt2"], "vocab_size": 16})
    # per block: c_attn 32x96, c_proj 32x32, c_fc 32x128, mlp c_proj 128x32; wte/wpe are lookups
    assert backbone_matmul_params(config) == 3 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)


def test_peak_tflops_by_gpu_name_or_config(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, peak in [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_tflops(cuda, None, half_precision=True) == peak
    assert peak_tflops(cuda, None, half_precision=False) is None  # fp32 peaks: not in the table
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some Future GPU")
    assert peak_tflops(cuda, None, half_precision=True) is None
    assert peak_tflops(torch.device("cpu"), None, True) is None
    assert peak_tflops(torch.device("cpu"), 2.5, True) == 2.5
    record = throughput_record(flops=8e12, seconds=2.0, devices=2, peak=4.0)
    assert record == {"tflops_per_device": 2.0, "mfu": 0.5}
    assert throughput_record(8e12, 2.0, 2, None) == {"tflops_per_device": 2.0}
