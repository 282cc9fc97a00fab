"""Item features for the teacher: the builder (text through a local encoder, attributes) and the
teacher's use of them (projected into the item table it reads and scores with, saved with it)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from recdistill.models.teacher import LLMRecTeacher, TeacherConfig

from .conftest import ROOT
from .test_teacher_model import TINY_LLAMA


def build_features(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "trainer/item_features.py"), *map(str, args)],
        capture_output=True,
        text=True,
    )


def raw_ids(data_dir) -> list[str]:
    return pq.read_table(data_dir / "item_map.parquet").to_pydict()["raw_item"]


def test_attribute_features_are_normalised_multi_hot_rows_by_vocabulary_id(demo_data, tmp_path):
    raw = raw_ids(demo_data)  # raw_item of vocabulary id i + 1
    attributes = {raw[0]: [7, 9], raw[2]: [9], "not-an-item": [1]}
    (tmp_path / "attrs.json").write_text(json.dumps(attributes))
    out = tmp_path / "attrs.safetensors"
    result = build_features(
        "--data", demo_data, "--out", out, "--attributes", tmp_path / "attrs.json"
    )
    assert result.returncode == 0, result.stderr
    features = load_file(str(out))["features"]
    assert features.shape == (len(raw) + 1, 2)  # attribute columns 7 and 9
    torch.testing.assert_close(features[1], torch.tensor([2**-0.5, 2**-0.5]))
    torch.testing.assert_close(features[3], torch.tensor([0.0, 1.0]))
    assert features[0].abs().sum() == 0 and features[2].abs().sum() == 0  # padding, unlisted
    assert f"{len(raw) - 2} items without a row" in result.stdout
    again = build_features(
        "--data", demo_data, "--out", out, "--attributes", tmp_path / "attrs.json"
    )
    assert again.returncode == 2 and "exists" in again.stderr + again.stdout  # never overwritten


def tiny_encoder(folder) -> None:
    """A random 2-layer BERT and a word-level tokenizer, saved as any local HF checkpoint."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "toy", "story", "comedy", "heat", "action"]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(words), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=32,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)


def test_text_features_are_the_encoders_mean_pooled_unit_vectors(demo_data, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    raw = raw_ids(demo_data)
    tiny_encoder(tmp_path / "encoder")
    lines = ["id\ttitle\tgenres", f"{raw[0]}\tToy Story\tComedy|Action", f"{raw[1]}\tHeat\tAction"]
    (tmp_path / "items.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "text.safetensors"
    result = build_features(
        "--data", demo_data, "--out", out, "--text", tmp_path / "items.tsv", "--id-column", "id",
        "--text-columns", "title", "genres", "--encoder", tmp_path / "encoder",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    features = load_file(str(out))["features"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "encoder")
    model = AutoModel.from_pretrained(tmp_path / "encoder").eval()
    with torch.no_grad():
        batch = tokenizer(["Toy Story Comedy Action"], return_tensors="pt")
        expected = model(**batch).last_hidden_state.mean(1)[0]
    torch.testing.assert_close(features[1], expected / expected.norm(), atol=1e-5, rtol=1e-4)
    assert features[2].norm() == pytest.approx(1.0) and features[3].abs().sum() == 0
    missing = build_features(
        "--data", demo_data, "--out", tmp_path / "y.safetensors", "--text", tmp_path / "items.tsv",
        "--id-column", "item", "--encoder", tmp_path / "encoder",
    )  # fmt: skip
    assert missing.returncode == 2 and "no column(s) ['item']" in missing.stderr + missing.stdout


def test_teacher_adds_projected_features_to_the_table_it_reads_and_scores_with(tmp_path):
    torch.manual_seed(0)
    features = torch.randn(41, 5)
    config = TeacherConfig(num_items=40, backbone=TINY_LLAMA, item_dim=16, item_feature_dim=5)
    model = LLMRecTeacher(config, item_features=features).eval()
    table = model.item_table()
    expected = model.item_embeddings.weight + model.item_feature_proj(model.item_features)
    torch.testing.assert_close(table, expected)
    assert table[0].abs().sum() == 0  # padding: zero features, a bias-free projection
    # the input side reads the same table: features change what the backbone sees
    ids, lengths = torch.tensor([[3, 4, 5]]), torch.tensor([3])
    out = model(ids, lengths, targets=torch.tensor([[4, 5, 6]]))
    out.loss.backward()
    assert model.item_feature_proj.weight.grad.abs().sum() > 0
    plain = LLMRecTeacher(TeacherConfig(num_items=40, backbone=TINY_LLAMA, item_dim=16)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(plain(ids, lengths).user_reps, model(ids, lengths).user_reps)
    # the features travel with the release
    model.save_pretrained(tmp_path / "release")
    loaded = LLMRecTeacher.from_pretrained(tmp_path / "release")
    torch.testing.assert_close(loaded.item_table(), model.item_table())
    with pytest.raises(ValueError, match="item features of shape"):
        LLMRecTeacher(config, item_features=torch.randn(40, 5))


def test_cooccurrence_ppmi_matches_a_hand_worked_log():
    from recdistill.trainer.item_features import cooccurrence_ppmi

    # one user [1, 2, 3], window 2: counts 1-2 and 2-3 are 1 (adjacent), 1-3 is 1/2 (two apart);
    # row totals 1.5, 2, 1.5 of 5; PMI(1,2) = log(1 * 5 / (1.5 * 2)), PMI(1,3) = log(0.5 * 5 / 1.5**2)
    ppmi = cooccurrence_ppmi(np.array([1, 2, 3]), np.array([0, 0, 0]), 4, window=2).to_dense()
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[1, 2] = expected[2, 1] = expected[2, 3] = expected[3, 2] = math.log(5 / 3)
    expected[1, 3] = expected[3, 1] = math.log(2.5 / 2.25)
    torch.testing.assert_close(ppmi, expected)
    # an unknown item (0) keeps its place but pairs with nothing; users never pair across
    ppmi = cooccurrence_ppmi(np.array([1, 0, 3, 2]), np.array([0, 0, 0, 1]), 4, window=2)
    dense = ppmi.to_dense()
    assert dense.nonzero().tolist() == [[1, 3], [3, 1]]  # only 1-3, two apart, in user 0
    assert dense[1, 3] == pytest.approx(math.log(2))  # 0.5 * 1 / (0.5 * 0.5)
    # a pair no likelier than chance is dropped: users [1, 3] x3, [2, 4] x3, [1, 2] give
    # counts 1-3 = 2-4 = 3, 1-2 = 1, totals 4, 4, 3, 3 of 14: PMI(1,2) = log(14 / 16) < 0
    items = np.array([1, 3] * 3 + [2, 4] * 3 + [1, 2])
    dense = cooccurrence_ppmi(items, np.arange(len(items)) // 2, 5, window=1).to_dense()
    assert dense[1, 2] == 0 and dense[2, 1] == 0
    assert dense[1, 3] == pytest.approx(math.log(3 * 14 / 12))


def test_svd_rows_are_the_normalised_rows_of_u_sqrt_s():
    from recdistill.trainer.item_features import svd_rows

    generator = torch.Generator().manual_seed(0)
    values = torch.rand(7, 7, generator=generator, dtype=torch.float64)
    matrix = values + values.T  # symmetric, as a PPMI
    matrix[0] = matrix[:, 0] = 0  # the padding row
    rows = torch.from_numpy(svd_rows(matrix.to_sparse(), dim=6)).double()
    # at full rank U S U^T is |M| whatever the signs and order of the singular vectors
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    absolute = vectors @ torch.diag(eigenvalues.abs()) @ vectors.T
    scale = absolute.diagonal().clamp(min=1e-12).rsqrt()
    expected = scale[:, None] * absolute * scale[None, :]
    expected[0] = expected[:, 0] = 0
    torch.testing.assert_close(rows @ rows.T, expected, atol=1e-4, rtol=1e-4)
    assert rows[0].abs().sum() == 0
    low = svd_rows(matrix.to_sparse(), dim=2)
    assert low.shape == (7, 2) and np.allclose(np.linalg.norm(low[1:], axis=1), 1, atol=1e-5)


def test_interaction_features_sit_beside_the_other_sources(demo_data, tmp_path):
    raw = raw_ids(demo_data)
    (tmp_path / "attrs.json").write_text(json.dumps({raw[0]: [7], raw[1]: [9]}))
    out, again = tmp_path / "both.safetensors", tmp_path / "again.safetensors"
    for path in (out, again):
        result = build_features(
            "--data", demo_data, "--out", path, "--attributes", tmp_path / "attrs.json",
            "--interactions", demo_data, "--dim", 8,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    features = load_file(str(out))["features"]
    assert features.shape == (len(raw) + 1, 2 + 8)  # attributes 7, 9, then 8 SVD columns
    torch.testing.assert_close(features[1, :2], torch.tensor([1.0, 0.0]))
    norms = features[1:, 2:].norm(dim=1)
    assert ((norms - 1).abs() < 1e-5).sum() > 0.9 * len(raw)  # unit rows (or zero: never seen)
    assert features[0].abs().sum() == 0
    assert torch.equal(features, load_file(str(again))["features"])  # the same file each time
    assert "from interactions" in result.stdout and "items without a row" in result.stdout
    none = build_features("--data", demo_data, "--out", tmp_path / "none.safetensors")
    assert none.returncode == 2 and "at least one source" in none.stderr
