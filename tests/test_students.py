"""Students: causal outputs at every position, padding invariance, files, LLaMA init from the teacher."""

from __future__ import annotations

import pytest
import torch

from recdistill.models import STUDENTS, LlamaStudent
from recdistill.models.release import load_student
from recdistill.models.teacher import LLMRecTeacher, TeacherConfig
from recdistill.trainer.data.batches import pad_right

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 8,
    "max_position_embeddings": 32,
}


def make(architecture: str):
    torch.manual_seed(0)
    config_class, model_class = STUDENTS[architecture]
    options = (
        {"backbone": dict(TINY_LLAMA, num_hidden_layers=2), "item_dim": 8}
        if architecture == "llama"
        else {}
    )
    return model_class(config_class(num_items=20, max_len=12, **options)).eval()


@pytest.mark.parametrize("architecture", list(STUDENTS))
def test_outputs_are_causal_and_padding_invariant(architecture):
    model = make(architecture)
    ids, lengths = pad_right([[3, 4, 5, 6], [7, 8]])
    out = model(ids, lengths)
    assert out.user_reps.shape[:2] == (2, 4) and out.block_states
    # position 1 of the first user only depends on items 3, 4
    changed = model(*pad_right([[3, 4, 9, 10], [7, 8]])).user_reps
    torch.testing.assert_close(changed[0, :2], out.user_reps[0, :2], atol=1e-5, rtol=1e-5)
    alone = model(*pad_right([[7, 8]])).user_reps
    torch.testing.assert_close(alone[0], out.user_reps[1, :2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", list(STUDENTS))
def test_save_and_load(architecture, tmp_path):
    model = make(architecture)
    model.save_pretrained(tmp_path)
    loaded = load_student(tmp_path)
    ids, lengths = pad_right([[3, 4, 5]])
    torch.testing.assert_close(loaded(ids, lengths).user_reps, model(ids, lengths).user_reps)


def test_dllm2rec_defaults():
    sasrec, caser = make("sasrec"), make("caser")
    assert sasrec.config.hidden_size == 64 and sasrec.config.dropout == 0.1
    assert caser.config.horizontal_heights == [2, 3, 4] and caser.config.horizontal_filters == 16


def caser_by_window_convolution(model, item_ids):
    """Caser as the reference writes it: every window of W items convolved on its own."""
    window = model.config.window
    windows = torch.nn.functional.pad(item_ids, (window - 1, 0)).unfold(1, window, 1)
    x = model.item_embeddings(windows.reshape(-1, window)).unsqueeze(1)  # [B*L, 1, W, d]
    pooled = [torch.relu(conv(x).squeeze(3)).max(dim=2).values for conv in model.horizontal]
    features = torch.cat([*pooled, model.vertical(x).reshape(x.shape[0], -1)], dim=1)
    return torch.relu(model.out(features)).reshape(*item_ids.shape, -1)


def test_caser_equals_per_window_convolution():
    torch.manual_seed(0)
    config_class, model_class = STUDENTS["caser"]
    model = model_class(config_class(num_items=30, max_len=16, vertical_filters=2)).eval()
    ids, lengths = pad_right([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [7, 8, 29]])
    torch.testing.assert_close(
        model(ids, lengths).user_reps, caser_by_window_convolution(model, ids)
    )


def test_caser_masks_padding_positions_whatever_the_padding_row_holds():
    torch.manual_seed(0)
    config_class, model_class = STUDENTS["caser"]
    model = model_class(config_class(num_items=30, max_len=16)).eval()
    assert model.item_embeddings.weight[0].abs().sum() == 0  # zero after the normal init
    ids, lengths = pad_right([[3, 4, 5], [7, 8, 29, 30, 2, 1]])
    clean = model(ids, lengths).user_reps
    with torch.no_grad():
        model.item_embeddings.weight[0].fill_(5.0)  # e.g. a fused or trained padding row
    torch.testing.assert_close(model(ids, lengths).user_reps, clean)


def test_llama_student_from_teacher_layers(tmp_path):
    torch.manual_seed(0)
    teacher = LLMRecTeacher(TeacherConfig(num_items=20, backbone=TINY_LLAMA, item_dim=8)).eval()
    teacher.save_pretrained(tmp_path)
    every_other = LlamaStudent.from_teacher(tmp_path, [0, 2]).eval()
    assert every_other.config.backbone["num_hidden_layers"] == 2
    torch.testing.assert_close(
        every_other.model.backbone.layers[1].mlp.up_proj.weight,
        teacher.backbone.layers[2].mlp.up_proj.weight,
    )
    # all layers copied: the student is the teacher
    full = LlamaStudent.from_teacher(tmp_path, [0, 1, 2, 3]).eval()
    ids, lengths = pad_right([[3, 4, 5]])
    torch.testing.assert_close(full(ids, lengths).user_reps, teacher(ids, lengths).user_reps)


def test_llama_student_from_a_lora_teacher_release(tmp_path):
    """The shipped 7B teacher trains with LoRA: its layers reach the student merged."""
    torch.manual_seed(0)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    config = TeacherConfig(num_items=20, backbone=TINY_LLAMA, item_dim=8, lora=lora)
    teacher = LLMRecTeacher(config)
    with torch.no_grad():  # non-zero adapters: merging them is observable
        for name, param in teacher.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    teacher.save_pretrained(tmp_path)
    merged = LLMRecTeacher.from_pretrained(tmp_path).eval()
    student = LlamaStudent.from_teacher(tmp_path, [0, 1, 2, 3]).eval()
    ids, lengths = pad_right([[3, 4, 5, 6]])
    torch.testing.assert_close(student(ids, lengths).user_reps, merged(ids, lengths).user_reps)


def test_llama_student_from_a_prefix_mode_lora_teacher(tmp_path, monkeypatch):
    """A prefix-mode teacher's student reads the same prompt; its output at each user's last item
    is the teacher's prediction, and its block states there are the teacher's hidden states at
    the last backbone position (what precompute stores and alignment compares)."""
    torch.manual_seed(0)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    config = TeacherConfig(
        num_items=20,
        backbone=TINY_LLAMA,
        item_dim=8,
        lora=lora,
        mode="prefix",
        prompt_prefix_ids=[1, 2, 3],
        prompt_suffix_ids=[4, 5],
    )
    teacher = LLMRecTeacher(config)
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    teacher.save_pretrained(tmp_path / "teacher")
    merged = LLMRecTeacher.from_pretrained(tmp_path / "teacher").eval()

    def no_whole_teacher(*args, **kwargs):
        raise AssertionError("from_teacher must read only the tensors it keeps")

    monkeypatch.setattr(LLMRecTeacher, "from_pretrained", no_whole_teacher)
    student = LlamaStudent.from_teacher(tmp_path / "teacher", [0, 1, 2, 3]).eval()
    assert student.config.mode == "prefix" and student.config.prompt_suffix_ids == [4, 5]
    ids, lengths = pad_right([[3, 4, 5, 6], [7, 8]])
    out = student(ids, lengths)
    assert out.user_reps.shape == (2, 4, 8)
    rows = torch.arange(2)
    reference = merged(ids, lengths, hidden_layers=(2, 4))
    torch.testing.assert_close(out.user_reps[rows, lengths - 1], reference.user_reps[:, 0])
    assert out.user_reps[0, :3].abs().sum() == 0 and out.user_reps[1, 2:].abs().sum() == 0
    last = merged.last_positions(lengths)
    for block, layer in ((2, 2), (4, 4)):
        torch.testing.assert_close(
            out.block_states[block - 1][rows, lengths - 1],
            reference.hidden_states[layer][rows, last],
        )
    student.save_pretrained(tmp_path / "student")
    reloaded = load_student(tmp_path / "student")
    assert reloaded.config.mode == "prefix"
    torch.testing.assert_close(reloaded(ids, lengths).user_reps, out.user_reps)
    # a cut of the teacher: layers 1 and 3 only
    cut = LlamaStudent.from_teacher(tmp_path / "teacher", [1, 3])
    torch.testing.assert_close(
        cut.model.backbone.layers[1].self_attn.q_proj.weight,
        merged.backbone.layers[3].self_attn.q_proj.weight,
    )
    with pytest.raises(ValueError, match="teacher_layers"):
        LlamaStudent.from_teacher(tmp_path / "teacher", [0, 4])


@pytest.mark.parametrize("architecture", list(STUDENTS))
def test_inputs_from_an_external_item_table(architecture):
    """DLLM2Rec's collaborative embedding hands every student a changed item table: the inputs
    must come from it (the model's own table gives the same output when passed explicitly)."""
    model = make(architecture)
    ids, lengths = pad_right([[3, 4, 5, 6], [7, 8]])
    own = model.item_table().detach().clone()
    torch.testing.assert_close(model(ids, lengths, own).user_reps, model(ids, lengths).user_reps)
    shifted = model(ids, lengths, own + 0.5 * torch.randn_like(own)).user_reps
    assert not torch.allclose(shifted, model(ids, lengths).user_reps, atol=1e-4)


def test_sasrec_init_std():
    config_class, model_class = STUDENTS["sasrec"]
    torch.manual_seed(0)
    default = model_class(config_class(num_items=2000, max_len=12, init_std=None))
    small = model_class(config_class(num_items=2000, max_len=12))  # the default: 0.02
    std = lambda tensor: float(tensor.detach().std())  # noqa: E731
    assert std(default.item_embeddings.weight) == pytest.approx(64**-0.5, rel=0.05)
    assert std(small.item_embeddings.weight[1:]) == pytest.approx(0.02, rel=0.05)
    assert small.item_embeddings.weight[0].abs().sum() == 0  # padding row
    ffn = small.blocks[0].ffn[0]
    assert std(ffn.weight) == pytest.approx(0.02, rel=0.2) and ffn.bias.abs().sum() == 0
    assert std(small.position_embeddings.weight) == pytest.approx(0.02, rel=0.2)
