"""The loss-weight procedure of the demo and the benchmark (launcher/tuning.py): candidates from the
grid, the choice on validation only, and the demo's use of its recorded choice."""

from __future__ import annotations

import json

import yaml

from recdistill.launcher import demo, tuning
from recdistill.trainer.config import load_config, save_config
from recdistill.trainer.defaults import DISTILL

from .conftest import ROOT


def test_grid_candidates_official_value_first_and_none_for_untuned_variants():
    grid = tuning.load_grid()  # configs/tuning/grid.yaml
    dllm2rec = tuning.candidates(grid, "dllm2rec")
    # the code's: no reliability rule, the ranking term's BCE form, ed_weight 0.2
    assert dllm2rec[0] == [
        'loss.reliability="none"',
        'loss.ranking.form="bce"',
        "loss.embedding.weight=0.2",
    ]
    assert len(dllm2rec) == 8
    assert tuning.candidates(grid, "plain") == []
    assert tuning.candidates(grid, "paper_dllm2rec") == []  # the paper's row runs as its code
    # every override of every candidate loads under the distillation job's strict keys
    for variant in grid:
        for overrides in tuning.candidates(grid, variant):
            load_config(ROOT / "configs/distill_demo.yaml", overrides, DISTILL)
    assert tuning.choose([0.10, 0.12, 0.12]) == 1  # the first of equals


def _fake_runs(monkeypatch, valid_by_run: dict):
    """distill_run that writes a release whose metrics make the given validation NDCG@10 (and a
    test NDCG@10 that would pick the opposite candidate: the choice must never read it)."""
    trained = []

    def fake_distill_run(out, stage, run_dir, overrides):
        trained.append(run_dir.name)
        (run_dir / "final").mkdir(parents=True, exist_ok=True)
        valid = valid_by_run.get(run_dir.name, 0.1)
        metrics = {"best_valid_ndcg@10": valid, "student": {"ndcg@10": 1.0 - valid}}
        (run_dir / "final/metrics.json").write_text(json.dumps(metrics))
        config = load_config(ROOT / "configs/distill_demo.yaml", overrides, DISTILL)
        save_config(config, run_dir / "run_config.yaml")
        return 1.0

    monkeypatch.setattr(demo, "distill_run", fake_distill_run)
    return trained


def test_demo_tune_chooses_on_validation_and_the_distill_stage_uses_it(tmp_path, monkeypatch):
    trained = _fake_runs(monkeypatch, {"dllm2rec_t4": 0.3, "slmrec_t1": 0.2})
    demo.tune_stage(tmp_path, {})
    grid = tuning.load_grid()
    expected = [f"{v}_t{i}" for v in ("dllm2rec", "slmrec", "both", "logit_kl")
                for i in range(len(tuning.candidates(grid, v)))]  # fmt: skip
    assert trained == expected
    chosen = yaml.safe_load((tmp_path / "tuning.yaml").read_text())["chosen"]
    assert chosen["student_dllm2rec"]["chosen"] == 4
    assert (
        demo.chosen_overrides(tmp_path, "student_dllm2rec")
        == tuning.candidates(grid, "dllm2rec")[4]
    )
    assert demo.chosen_overrides(tmp_path, "student_slmrec") == tuning.candidates(grid, "slmrec")[1]
    assert demo.chosen_overrides(tmp_path, "student_plain") == []
    # the distill stage takes the chosen candidate's run as the student instead of training it again
    overrides = [
        *demo.DISTILL_VARIANTS["student_dllm2rec"],
        *tuning.candidates(grid, "dllm2rec")[4],
    ]
    demo.reuse_tuned_run(tmp_path, "student_dllm2rec", tmp_path / "student/dllm2rec", overrides)
    reused = json.loads((tmp_path / "student/dllm2rec/final/metrics.json").read_text())
    assert reused["best_valid_ndcg@10"] == 0.3


def test_demo_without_its_own_tuning_uses_the_recorded_choice(tmp_path):
    recorded = yaml.safe_load(demo.DEMO_TUNING.read_text())["chosen"]
    grid = tuning.load_grid()
    for name, choice in recorded.items():  # the record is of today's grid, candidate for candidate
        assert [c["overrides"] for c in choice["candidates"]] == tuning.candidates(
            grid, name.removeprefix("student_")
        ), f"configs/tuning/demo.yaml is of another grid: rerun `demo --tune` ({name})"
    for name in demo.DEMO_STUDENTS:
        overrides = demo.chosen_overrides(tmp_path, name)
        if name in recorded:
            assert overrides == recorded[name]["candidates"][recorded[name]["chosen"]]["overrides"]
            choice = recorded[name]
            best = max(c["valid_ndcg@10"] for c in choice["candidates"])
            assert choice["candidates"][choice["chosen"]]["valid_ndcg@10"] == best
        load_config(
            ROOT / "configs/distill_demo.yaml",
            [*demo.DISTILL_VARIANTS[name], *overrides],
            DISTILL,
        )


def test_a_finished_demo_student_with_other_loss_settings_is_not_reused(tmp_path):
    run = tmp_path / "student"
    run.mkdir()
    overrides = [*demo.DISTILL_VARIANTS["student_dllm2rec"], "loss.embedding.weight=1.0"]
    save_config(
        load_config(ROOT / "configs/distill_demo.yaml", overrides, DISTILL),
        run / "run_config.yaml",
    )
    assert demo.same_losses(run, overrides)
    assert not demo.same_losses(run, demo.DISTILL_VARIANTS["student_dllm2rec"])
