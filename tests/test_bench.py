"""The benchmark scripts: user sampling, summaries, and a tiny end-to-end run of
bench/quality.py and bench/speed.py (real jobs: deepspeed teacher and precompute on 2 CPU ranks,
Accelerate students) that also checks an interrupted benchmark reruns only what is missing."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from recdistill.trainer.data.shards import iter_samples, load_manifest

from .conftest import ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


quality = _load("quality")
speed = _load("speed")
headline = _load("headline")
teacher_ablation = _load("teacher_ablation")
large_model = _load("large_model")


def test_sample_users_keeps_whole_users(tmp_path):
    source = tmp_path / "log.txt"
    source.write_text("".join(f"{u} {i}\n" for u in range(1, 6) for i in range(u, u + 3)))
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    quality.sample_users(source, 3, 0, first)
    quality.sample_users(source, 3, 0, second)
    kept = first.read_text().splitlines()
    users = {line.split()[0] for line in kept}
    assert len(users) == 3 and len(kept) == 9  # every line of a chosen user, nothing else
    assert first.read_text() == second.read_text()  # seeded
    with pytest.raises(SystemExit, match="sample_users 5 >= the 5 users"):
        quality.sample_users(source, 5, 0, first)


def test_summary_and_table():
    summary = quality.summarize([0.1, 0.2, 0.3])
    assert summary["mean"] == pytest.approx(0.2) and summary["std"] == pytest.approx(0.1)
    row = {m: quality.summarize([value]) for m, value in zip(quality.METRICS, (0.2, 0.1, 0.05))}
    better = {m: quality.summarize([value]) for m, value in zip(quality.METRICS, (0.3, 0.12, 0.06))}
    teacher = {m: quality.summarize([value]) for m, value in zip(quality.METRICS, (0.4, 0.2, 0.1))}
    report = {
        "scale": "t",
        "command": "python bench/quality.py",
        "device": "cpu",
        "minutes": 1.0,
        "seeds": [0],
        "exclude_seen": True,
        "published": {"d": {"row": "sasrec/plain", "source": "paper", "ndcg@10": 0.2}},
        "datasets": {
            "d": {
                "data": {"users": 10, "items": 5, "interactions": 50},
                "rows": {"teacher": teacher, "sasrec/plain": row, "sasrec/both": better},
            }
        },
    }
    table = quality.markdown(report)
    # the teacher leads by 0.1 NDCG@10 and both gains 0.02 of it
    assert (
        "| sasrec/both | 0.3000 ± 0.0000 | 0.1200 ± 0.0000 | 0.0600 ± 0.0000 | +20.0% | 20% ± 0% |"
        in table
    )
    assert "Teacher's lead over sasrec/plain: +100.0% NDCG@10 (0.2000 ± 0.0000 vs 0.1000" in table
    assert "over the items each user has not interacted with" in table
    assert "Published sasrec/plain (paper): NDCG@10 0.2000 (here 0.1000, -50.0%)." in table


def test_gap_closure_per_seed_and_paper_rows_against_their_own_plain():
    plain = quality.summarize([0.10, 0.12])
    distilled = quality.summarize([0.13, 0.13])
    teacher = quality.summarize([0.16, 0.18])  # leads the plain mean 0.11 by 0.06
    gap = quality.gap_closure(distilled, plain, teacher)
    assert gap["values"] == pytest.approx([0.5, 1 / 6])
    assert quality.gap_closure(distilled, plain, quality.summarize([0.1, 0.1])) is None
    assert quality.baseline_variant("paper_dllm2rec") == "paper_plain"
    assert quality.baseline_variant("both") == "plain"


def test_tuning_picks_the_best_validation_candidate_and_every_seed_uses_it(tmp_path, monkeypatch):
    """The `tune` grid: each candidate trains at the first seed, the best validation NDCG@10 is
    chosen (test metrics are never read: they are made worse here for the chosen one), and the
    other seeds run only the chosen setting."""
    from tqdm import tqdm

    scale = {
        "student_jobs": 1,
        "tune": {"dllm2rec": {"loss.ranking.weight": [0.8, 0.2], "loss.reliability": ["none"]}},
    }
    assert quality.tune_candidates(scale, "dllm2rec") == [
        ["loss.ranking.weight=0.8", 'loss.reliability="none"'],
        ["loss.ranking.weight=0.2", 'loss.reliability="none"'],
    ]
    assert quality.tune_candidates(scale, "plain") == []
    trained = []

    def fake_train_student(scale, name, spec, paths, student, variant, seed, work, candidate):
        run = work / name / "students" / quality.student_run_name(student, variant, seed, candidate)
        if (run / "final").is_dir():
            return  # as the real one: a finished run is reused
        trained.append((variant, seed, candidate))
        (run / "final").mkdir(parents=True)
        valid = {None: 0.1, 0: 0.2, 1: 0.3}[candidate]
        metrics = {"best_valid_ndcg@10": valid, "student": {"ndcg@10": 1 - valid}}
        (run / "final/metrics.json").write_text(json.dumps(metrics))

    monkeypatch.setattr(quality, "train_student", fake_train_student)
    runs = [("sasrec", v, seed) for v in ("plain", "dllm2rec") for seed in (0, 1)]
    with tqdm(disable=True) as progress:
        quality.train_students(scale, "toy", {}, {}, runs, tmp_path, progress)
    assert trained == [
        ("dllm2rec", 0, 0), ("dllm2rec", 0, 1),  # the candidates at the first seed
        ("plain", 0, None), ("plain", 1, None), ("dllm2rec", 1, 1),  # seed 0's run is reused
    ]  # fmt: skip
    choice = json.loads((tmp_path / "toy/tuning.json").read_text())["sasrec/dllm2rec"]
    assert choice["chosen"] == 1 and choice["candidates"][1]["valid_ndcg@10"] == 0.3


def test_other_users_features_come_from_the_users_the_sample_left_out(tmp_path):
    data_root, work = tmp_path / "data", tmp_path / "work"
    (data_root / "toy").mkdir(parents=True)
    _markov_log(data_root / "toy/log.txt", users=120, items=30)
    attributes = {str(item): [item % 4] for item in range(1, 31)}
    (data_root / "toy/attrs.json").write_text(json.dumps(attributes))
    spec = {
        "path": "toy/log.txt", "format": "lines", "sample_users": 50, "max_len": 10,
        "item_features": {"attributes": "toy/attrs.json"},
    }  # fmt: skip
    scale = {"name": "toy", "job_timeout_s": 600}
    data_dir = quality.prepare({**scale, "exclude_seen": True}, "toy", spec, data_root, work)
    row = {"name": "cooc", "features": {"other_users": True}}
    source = teacher_ablation.row_features(row, spec)
    assert source == {"attributes": "toy/attrs.json", "other_users": True}
    features = quality.item_features(scale, "toy", spec, data_dir, data_root, work, source)
    assert features.name == "item_features_other_users.safetensors"
    from recdistill.trainer.data.pipeline import load_sequences

    splits, stats = load_sequences(data_dir)
    sampled = set(splits["test"]["user"])
    others = set(load_sequences(work / "toy/other_users/data")[0]["test"]["user"])
    assert sampled and others and not sampled & others  # none of the sampled users' interactions
    assert len(sampled | others) <= 120
    table = load_file(str(features))["features"]
    assert table.shape == (stats["items"] + 1, 4 + stats["items"])  # attributes, then the SVD
    plain = quality.item_features(scale, "toy", spec, data_dir, data_root, work)
    assert plain.name == "item_features.safetensors"  # the dataset's own sources, a file apart
    assert load_file(str(plain))["features"].shape[1] == 4
    assert teacher_ablation.row_features({"name": "ids"}, spec) is None
    with pytest.raises(SystemExit, match="was made from .*; delete it"):
        other = {"attributes": "toy/attrs.json", "other_users": True, "text": "toy/t.tsv"}
        quality.item_features(scale, "toy", spec, data_dir, data_root, work, other)
    with pytest.raises(SystemExit, match=r"unknown keys \['other_user'\]"):
        quality.item_features(scale, "toy", spec, data_dir, data_root, work, {"other_user": True})
    with pytest.raises(SystemExit, match="needs sample_users"):
        quality.other_users_data("toy", {**spec, "sample_users": None}, data_root, work)
    # the same users train a teacher too (teacher_other_users / a row's other_users): the config
    # names their folder, and the teacher job takes it (no evaluated user among them)
    from recdistill.trainer.teacher import extra_sequences

    final = work / "toy/teacher_s0/final"
    final.mkdir(parents=True)
    (final / "metrics.json").write_text("{}")  # a finished run: only the config is written
    teacher_scale = {**scale, "teacher": {"config": "configs/teacher_demo.yaml", "overrides": []}}
    others_dir = quality.other_users_data("toy", spec, data_root, work)
    quality.train_teacher(teacher_scale, "toy", spec, data_dir, 0, work, extra_dirs=(others_dir,))
    config = yaml.safe_load((work / "toy/configs/teacher_s0.yaml").read_text())
    assert config["data"]["extra_dirs"] == [str(others_dir)]
    extra = extra_sequences(str(data_dir), config["data"]["extra_dirs"])
    assert 0 < len(extra) <= len(others) and all(len(items) >= 2 for items in extra)


def test_teacher_ablation_report_marks_the_validation_choice_and_failed_rows():
    rows = [
        {"name": "features", "features": True},
        {"name": "table frozen", "features": True, "item_table": True,
         "overrides": ["model.freeze_item_embeddings=true"]},
        {"name": "wide", "overrides": ["model.backbone.hidden_size=256"]},
    ]  # fmt: skip
    done = {
        "features": {0: {"valid_ndcg@10": 0.12, "test": {"ndcg@10": 0.10}}},
        "table frozen": {0: {"valid_ndcg@10": 0.13, "test": {"ndcg@10": 0.11}}},
        "wide": {0: {"error": "bench: job failed (exit 1); log: wide_s0.log"}},
    }
    report = {
        "scale": "t", "command": "python bench/teacher_ablation.py", "minutes": 1.0,
        "seeds": [0], "rows": rows,
        "datasets": {"d": {"rows": done, "sasrec": {0: {"ndcg@10": 0.10}}}},
    }  # fmt: skip
    table = teacher_ablation.markdown(report)
    assert (
        "| table frozen | `model.freeze_item_embeddings=true`, item features, SASRec item table "
        "| 1 | 0.1300 | 0.1100 | +10.0% |" in table
    )
    assert "| wide | `model.backbone.hidden_size=256` | failed: bench: job failed" in table
    assert "Best on validation: table frozen." in table
    assert teacher_ablation.slug("table frozen lr 5e-4") == "table_frozen_lr_5e_4"


def _markov_log(path, users: int, items: int, seed: int = 0) -> None:
    """A `lines` file whose users walk a sparse item graph: learnable next-item structure."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(1, items + 1, size=(items + 1, 3))
    lines = []
    for user in range(1, users + 1):
        item = int(rng.integers(1, items + 1))
        sequence = [item]
        for _ in range(int(rng.integers(8, 20))):
            item = int(successors[item, rng.integers(0, 3)])
            sequence.append(item)
        lines.append(" ".join(map(str, [user, *sequence])))
    path.write_text("\n".join(lines) + "\n")


def test_quality_and_speed_end_to_end(tmp_path):
    data_root = tmp_path / "data"
    (data_root / "toy").mkdir(parents=True)
    _markov_log(data_root / "toy/log.txt", users=400, items=60)
    scale = yaml.safe_load((ROOT / "bench/configs/cpu.yaml").read_text())
    scale["seeds"] = [0]
    scale["exclude_seen"] = True  # whole histories prepared and ranked out by every job
    scale["job_timeout_s"] = 600  # a hung job fails the test by name instead of hanging CI
    # the teacher's item features from attributes (every item one of 5 categories)
    attributes = {str(item): [item % 5] for item in range(1, 61)}
    (data_root / "toy/attrs.json").write_text(json.dumps(attributes))
    features = {"attributes": "toy/attrs.json"}
    scale["datasets"] = {
        "toy": {"path": "toy/log.txt", "format": "lines", "max_len": 10, "item_features": features}
    }
    scale["tune"] = {}  # the tuning procedure has its own test
    scale["teacher"]["overrides"] += ["train.epochs=2", "train.eval_every=6"]
    scale["precompute"]["overrides"] = ["topk=10", "hidden_layers=[2,4]", "shard_size=50"]
    scale["distill"]["overrides"] += ["train.epochs=2", "train.eval_every=3"]
    scale_file = tmp_path / "toy.yaml"
    scale_file.write_text(yaml.safe_dump(scale))
    work, results = tmp_path / "work", tmp_path / "results"
    args = [
        "--scale", str(scale_file), "--data-root", str(data_root), "--work", str(work),
        "--students", "sasrec", "gru4rec", "--variants", "plain", "both",
        "--results", str(results),
    ]  # fmt: skip
    assert quality.main(args) == 0
    report = json.loads((results / "quality_toy.json").read_text())
    rows = report["datasets"]["toy"]["rows"]
    assert set(rows) == {"popularity", "teacher", "sasrec/plain", "sasrec/both"} | {
        "gru4rec/plain",
        "gru4rec/both",
    }
    for values in rows.values():
        assert all(0.0 <= values[m]["mean"] <= 1.0 for m in quality.METRICS)
    teacher_config = yaml.safe_load((work / "toy/teacher_s0/run_config.yaml").read_text())
    assert teacher_config["model"]["item_features"] == str(work / "toy/item_features.safetensors")
    released = load_file(str(work / "toy/teacher_s0/final/model.safetensors"))
    assert released["item_features"].shape[1] == 5  # the features travel with the teacher
    # E4SRec: the teacher read the ID table of a plain SASRec trained first, and kept it frozen
    sasrec_release = work / "toy/item_table/sasrec_plain_s0/final"
    assert teacher_config["model"]["item_embeddings"] == str(sasrec_release)
    sasrec_table = load_file(str(sasrec_release / "model.safetensors"))["item_embeddings.weight"]
    assert torch.equal(released["item_embeddings.weight"], sasrec_table)
    # Whole histories were prepared (longer than the 10-item window) and ranked out, popularity too.
    from recdistill.trainer.data.pipeline import load_sequences
    from recdistill.trainer.evaluation import eval_split, popularity_metrics

    splits, stats = load_sequences(work / "toy/data")
    assert max(len(h) for h in splits["test"]["history"]) > 10
    train_items = list(splits["train"]["items"])
    examples, seen = eval_split(splits, "test", 10, exclude_history=True)
    unseen = popularity_metrics(train_items, examples, stats["items"], seen)
    everything = popularity_metrics(train_items, examples, stats["items"])
    assert rows["popularity"]["ndcg@10"]["mean"] == pytest.approx(unseen["ndcg@10"])
    assert unseen["ndcg@10"] != pytest.approx(everything["ndcg@10"])
    # two epochs already beat popularity on the item graph
    assert rows["sasrec/plain"]["ndcg@10"]["mean"] > 1.2 * rows["popularity"]["ndcg@10"]["mean"]
    curves = report["datasets"]["toy"]["curves"]  # validation points were logged, every run
    assert curves["teacher"] and all(
        curves[f"{s}/{v}"] for s in ("sasrec", "gru4rec") for v in ("plain", "both")
    )
    assert (results / "curves_toy_toy.png").stat().st_size > 10_000
    assert "| sasrec/both |" in (results / "quality_toy.md").read_text()

    # An interrupted benchmark: one student's release is gone; a rerun trains only that one
    # and reports the same numbers for everything else.
    finished = work / "toy/students/gru4rec_both_s0"
    metrics_before = json.loads((finished / "final/metrics.json").read_text())
    import shutil

    shutil.rmtree(finished / "final")
    quality.JOB_SECONDS.clear()
    assert quality.main(args) == 0
    assert list(quality.JOB_SECONDS) == ["gru4rec_both_s0"]
    rerun = json.loads((results / "quality_toy.json").read_text())["datasets"]["toy"]["rows"]
    assert rerun["sasrec/plain"] == rows["sasrec/plain"]
    assert (
        json.loads((finished / "final/metrics.json").read_text())["steps"]
        == metrics_before["steps"]
    )

    assert (
        speed.main(
            [
                "--work",
                str(work),
                "--scale",
                "toy",
                "--steps",
                "5",
                "--loader-batch-size",
                "4",
                "--results",
                str(results),
            ]
        )
        == 0
    )
    measured = json.loads((results / "speed_toy.json").read_text())["datasets"]["toy"]
    assert set(measured["inference"]) == {"teacher", "sasrec", "gru4rec"}
    assert measured["inference"]["teacher"]["speedup_vs_teacher"] == 1.0
    assert {p["student"] for p in measured["data_path"]} == {"sasrec", "gru4rec"}
    assert all(p["samples_per_s_from_shards"] > 0 for p in measured["data_path"])
    for path in measured["data_path"]:  # the loader's own time, against the in-memory step
        assert path["loader_ms_per_batch"] > 0 and path["step_ms_in_memory"] > 0
        assert path["loader_share_of_step"] == pytest.approx(
            path["loader_ms_per_batch"] / (path["loader_ms_per_batch"] + path["step_ms_in_memory"])
        )
    loader = measured["loader"]  # the loader alone, against the raw read and format 1
    assert [(e["workers"], e["gather"]) for e in loader["loaders"]] == [
        (0, "host"),
        (1, "host"),
        (2, "host"),
        (0, "device"),  # shards.gather=device: the loader alone (reads and plans)
        (0, "device (cpu)"),  # ... and the batches assembled on the device
    ]
    assert all(e["positions_per_s"] > 0 for e in loader["loaders"])
    assert all(e["main_thread_ms_per_batch"] > 0 for e in loader["loaders"])
    # the same training steps with the batches assembled on the device
    on_device = speed.data_path(work / "toy", "sasrec", 5, 0, torch.device("cpu"), 1, "device")
    assert on_device["gather"] == "device" and on_device["samples_per_s_from_shards"] > 0
    # the same samples rewritten in shards of 7, in the same order
    shards = work / "toy/shards"
    speed.loader_bench.reshard(shards, tmp_path / "resharded", 7)
    rewritten = load_manifest(tmp_path / "resharded")
    counts = [shard["count"] for shard in rewritten["shards"]]
    assert set(counts[:-1]) == {7} and sum(counts) == rewritten["examples"]
    assert rewritten["examples_per_group"] == 7  # the manifest says how it was cut

    def keys(folder, manifest):
        return [k for shard in manifest["shards"] for k, _ in iter_samples(folder / shard["file"])]

    assert keys(tmp_path / "resharded", rewritten) == keys(shards, load_manifest(shards))
    # one block a shard (as precompute writes), or blocks of --block-size
    assert all(shard["blocks"] == 1 for shard in rewritten["shards"])
    speed.loader_bench.reshard(shards, tmp_path / "in_blocks", 7, block_size=3)
    in_blocks = load_manifest(tmp_path / "in_blocks")
    assert [shard["blocks"] for shard in in_blocks["shards"]][:-1] == [3] * (len(counts) - 1)
    assert keys(tmp_path / "in_blocks", in_blocks) == keys(shards, load_manifest(shards))
    assert loader["raw_read_mb_per_s"] > 0 and loader["format1_loader"]["positions_per_s"] > 0
    # the page-cache read measured next to every loader run, the best of them the yardstick
    assert len(loader["raw_reads_mb_per_s"]) == len(loader["loaders"]) + 1
    assert loader["raw_read_mb_per_s"] == max(loader["raw_reads_mb_per_s"])
    assert loader["bytes_per_position_vs_format1"] < 1
    parts = loader["in_process_parts"]  # each part of the in-process loader alone
    assert set(parts) == {"read_decode_mb_per_s", "assemble_mb_per_s"}
    assert all(rate > 0 for rate in parts.values())
    assert "each part alone" in (results / "speed_toy.md").read_text()
    teacher = measured["teacher_training"]  # read back from the teacher's own log
    teacher_metrics = json.loads((work / "toy/teacher_s0/final/metrics.json").read_text())
    assert teacher["steps"] == teacher_metrics["steps"] and teacher["windows"] >= 1
    assert teacher["tflops_per_device"] > 0 and "mfu" not in teacher  # CPU: no known peak
    assert "model TFLOP/s per device" in (results / "speed_toy.md").read_text()
    storage = measured["storage"]
    assert storage["full_float32_logits_bytes_per_example"] == pytest.approx(
        storage["positions"] * storage["items"] * 4 / storage["examples"]
    )

    table = headline.headline(
        json.loads((results / "quality_toy.json").read_text()),
        json.loads((results / "speed_toy.json").read_text()),
    )
    sasrec_speedup = measured["inference"]["sasrec"]["speedup_vs_teacher"]
    plain, both = rows["sasrec/plain"]["ndcg@10"], rows["sasrec/both"]["ndcg@10"]
    assert (
        f"| sasrec | {sasrec_speedup:.1f}x | {headline.cell(plain)} | {headline.cell(both)} |"
        in table
    )


@pytest.mark.parametrize(
    "scale_name", sorted(p.stem for p in (ROOT / "bench/configs").glob("*.yaml"))
)
def test_scale_files_make_valid_job_configs(scale_name, tmp_path):
    """Every job config a scale file produces loads under the job's strict defaults (unknown
    keys are errors), and the student options build each student: the GPU scale, which cannot
    run here, is at least well-formed."""
    from recdistill.models.release import block_dims, build_student
    from recdistill.trainer.config import load_config
    from recdistill.trainer.defaults import DISTILL, PRECOMPUTE, TEACHER

    scale = quality.load_scale(scale_name)
    for name, spec in scale["datasets"].items():
        quality.write_job_config(
            scale["teacher"]["config"],
            [*scale["teacher"]["overrides"], *spec.get("teacher_overrides", [])],
            TEACHER,
            {"train.seed": 1},
            tmp_path / f"{name}_teacher.yaml",
        )
        quality.write_job_config(
            scale["precompute"]["config"],
            scale["precompute"]["overrides"],
            PRECOMPUTE,
            {},
            tmp_path / f"{name}_precompute.yaml",
        )
        for i, row in enumerate(scale.get("teacher_ablation", [])):
            quality.write_job_config(
                scale["teacher"]["config"],
                [
                    *scale["teacher"]["overrides"],
                    *spec.get("teacher_overrides", []),
                    *row.get("overrides", []),
                ],
                TEACHER,
                {},
                tmp_path / f"{name}_teacher_row{i}.yaml",
            )
        for student, section in scale["students"].items():
            model = build_student(
                {
                    **DISTILL["student"],
                    "architecture": section["architecture"],
                    "options": section["options"],
                },
                num_items=20,
                max_len=spec["max_len"],
            )
            for variant in scale["variants"]:
                for i, tuned in enumerate([[], *quality.tune_candidates(scale, variant)]):
                    quality.write_job_config(
                        scale["distill"]["config"],
                        quality.distill_overrides(scale, spec, student, variant, tuned),
                        DISTILL,
                        {"student.options": section["options"]},
                        tmp_path / f"{name}_{student}_{variant}_{i}.yaml",
                    )
                loss = load_config(tmp_path / f"{name}_{student}_{variant}_0.yaml")["loss"]
                if loss["alignment"]["enabled"] and loss["alignment"]["multi_supervision_weight"]:
                    assert len(block_dims(model)) > 1, (student, variant)


def test_student_overrides_reach_the_students_and_not_the_teachers_item_table(tmp_path):
    """A dataset's `student_overrides` (cpu_sasrec_more_users: 30 epochs on ML-1M) lengthen the
    report's students; the item-table SASRec the teacher reads keeps the scale's schedule."""
    scale = quality.load_scale("cpu_sasrec_more_users")
    spec = scale["datasets"]["ml-1m"]
    assert "train.epochs=30" in spec["student_overrides"]
    paths = {"data": tmp_path / "data", "shards": tmp_path / "shards"}
    epochs = {}
    for group in ("students", quality.ITEM_TABLE_GROUP):
        run_dir = tmp_path / "ml-1m" / group / "sasrec_plain_s0"
        (run_dir / "final").mkdir(parents=True)
        (run_dir / "final/metrics.json").write_text("{}")  # finished: only the config is written
        quality.train_student(
            scale, "ml-1m", spec, paths, "sasrec", "plain", 0, tmp_path, group=group
        )
        job = "sasrec_plain_s0" if group == "students" else f"{group}_sasrec_plain_s0"
        config = yaml.safe_load((tmp_path / f"ml-1m/configs/{job}.yaml").read_text())
        epochs[group] = config["train"]["epochs"]
    assert epochs == {"students": 30, quality.ITEM_TABLE_GROUP: 12}


def test_job_minutes_count_the_teachers_seed_runs_not_an_ablations():
    """A teacher ablation sharing the work folder records teacher_t1_s0: not the teacher stage,
    and not a student either; the student stage is its wall time when recorded."""
    times = {
        "prepare": 6.0,
        "item_features": 30.0,
        "item_table_sasrec_plain_s0": 60.0,
        "teacher_s0": 120.0,
        "teacher_s1": 180.0,
        "teacher_t1_s0": 600.0,
        "precompute": 12.0,
        "sasrec_plain_s0": 90.0,
        "sasrec_both_t1_s0": 150.0,
    }
    minutes = quality.stage_minutes(times, "students_wall_toy")
    assert minutes == {
        "item features": 0.5,
        "SASRec item tables": 1.0,
        "teacher": 5.0,
        "precompute": 0.2,
        "students": 4.0,
    }
    assert (
        quality.stage_minutes({**times, "students_wall_toy": 180.0}, "students_wall_toy")[
            "students"
        ]
        == 3.0
    )


def test_scale_extending_another_merges_appends_and_drops(tmp_path):
    """`extends`: mappings merge, overrides append (so later ones win), null drops a key; a
    chain of files resolves, a loop is refused, and the name is the extending file's."""
    middle = tmp_path / "middle.yaml"
    middle.write_text(
        "extends: cpu\nseeds: [0]\ndatasets: {beauty: null, ml-1m: {max_len: 20}}\n"
        "teacher: {overrides: [train.max_steps=5]}\n"
    )
    short = tmp_path / "short.yaml"
    short.write_text(f"extends: {middle}\nteacher: {{overrides: [train.max_steps=3]}}\n")
    cpu = quality.load_scale("cpu")
    scale = quality.load_scale(str(short))
    assert scale["name"] == "short" and "extends" not in scale
    assert scale["seeds"] == [0] and scale["device"] == cpu["device"]
    assert list(scale["datasets"]) == ["ml-1m"]
    assert scale["datasets"]["ml-1m"] == {**cpu["datasets"]["ml-1m"], "max_len": 20}
    assert scale["teacher"]["config"] == cpu["teacher"]["config"]
    assert scale["teacher"]["overrides"] == [
        *cpu["teacher"]["overrides"],
        "train.max_steps=5",
        "train.max_steps=3",
    ]
    assert scale["students"] == cpu["students"]
    looped = tmp_path / "looped.yaml"
    looped.write_text(f"extends: {looped}\n")
    with pytest.raises(SystemExit, match="extends itself"):
        quality.load_scale(str(looped))
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(f"extends: {second}\n")
    second.write_text(f"extends: {first}\n")
    with pytest.raises(SystemExit, match="extends itself"):
        quality.load_scale(str(first))
    # a file of its own named like the scale it extends is no loop
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu/gpu.yaml").write_text("extends: gpu\nseeds: [0]\n")
    assert quality.load_scale(str(tmp_path / "gpu/gpu.yaml"))["seeds"] == [0]


def test_job_past_its_timeout_is_ended_and_named(tmp_path):
    log = tmp_path / "logs/teacher_s0.log"
    command = [sys.executable, "-c", "import time; print('step 1', flush=True); time.sleep(120)"]
    with pytest.raises(SystemExit) as failure:
        quality.run_job(command, log, {}, timeout=3)
    message = str(failure.value)
    assert "job_timeout_s=3 s" in message and str(log) in message and "step 1" in message
    assert "teacher_s0" not in quality.JOB_SECONDS


def test_changed_scale_is_refused_not_reused(tmp_path):
    """A rerun reuses finished runs and resumes started ones, so a job whose settings changed
    since they were written (an edited scale file) stops with the keys that changed."""
    from recdistill.trainer.defaults import DISTILL

    config_path = tmp_path / "work/toy/configs/sasrec_plain_s0.yaml"
    write = lambda overrides: quality.write_job_config(  # noqa: E731
        "configs/distill_demo.yaml", overrides, DISTILL, {"train.seed": 0}, config_path
    )
    write(["train.lr=0.005"])
    written = config_path.read_text()
    assert write(["train.lr=0.005"]) == config_path  # the same job: reused
    with pytest.raises(SystemExit, match=r"train\.lr: 0\.005 -> 0\.001.*--work NEW_FOLDER"):
        write(["train.lr=0.001"])
    assert config_path.read_text() == written  # the earlier record is kept
    # an override of a key the run sets itself (here the seed) would be replaced: refused
    with pytest.raises(SystemExit, match=r"train\.seed in the scale's overrides"):
        write(["train.lr=0.005", "train.seed = 3"])
    # an option the earlier version did not have is not a change
    assert quality.differences({"a": 1}, {"a": 1, "new_option": None}) == []

    data_root, work = tmp_path / "data", tmp_path / "work"
    (data_root / "toy").mkdir(parents=True)
    _markov_log(data_root / "toy/log.txt", users=30, items=20)
    spec = {"path": "toy/log.txt", "format": "lines", "max_len": 5}
    data_dir = quality.prepare({"exclude_seen": False}, "toy", spec, data_root, work)
    stats = (data_dir / "stats.json").read_text()
    with pytest.raises(SystemExit, match=r"max_seq_len: 8 -> 0"):
        quality.prepare({"exclude_seen": True}, "toy", spec, data_root, work)
    assert (data_dir / "stats.json").read_text() == stats


def test_validation_curve_from_metrics_or_older_runs_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    current, older = tmp_path / "current", tmp_path / "older"
    current.mkdir()
    lines = [
        {"step": 1, "terms": {"total": 5.0}},
        {"step": 4, "valid/ndcg@10": 0.2},
        {"step": 8, "valid/ndcg@10": 0.3},
        {"step": 4, "valid/ndcg@10": 0.25},  # resumed from step 2: step 4 ran again
    ]
    (current / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert quality.validation_curve(current, 64) == [(256, 0.25), (512, 0.3)]
    # a student from before distill.py wrote validation to metrics.jsonl: TensorBoard only
    older.mkdir()
    (older / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    with SummaryWriter(str(older / "tensorboard")) as writer:
        for step, value in ((2, 0.5), (4, 0.75)):
            writer.add_scalar("valid/ndcg@10", value, step)
    assert quality.validation_curve(older, 10) == [(20, 0.5), (40, 0.75)]


def test_student_jobs_side_by_side_stop_at_a_failure(tmp_path, monkeypatch):
    """Students run `student_jobs` at a time; a failed job ends the stage with its error, the
    running ones finish and queued ones are dropped, and the stage's wall time is recorded."""
    import threading
    import time

    from tqdm import tqdm

    started, running, most_at_once = [], [0], [0]
    lock = threading.Lock()

    def fake_train_student(scale, name, spec, paths, student, variant, seed, work, candidate):
        with lock:
            started.append((student, variant, seed))
            running[0] += 1
            most_at_once[0] = max(most_at_once[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        if variant == "broken":
            raise SystemExit(f"bench: job failed (exit 1); log: {student}_{variant}_s{seed}.log")

    monkeypatch.setattr(quality, "train_student", fake_train_student)
    runs = [("sasrec", "plain", 0), ("sasrec", "broken", 0)] + [
        ("caser", "plain", seed) for seed in range(6)
    ]
    with tqdm(total=len(runs), disable=True) as progress:
        with pytest.raises(SystemExit, match="sasrec_broken_s0.log"):
            quality.train_students(
                {"student_jobs": 2}, "toy", {}, {}, runs, tmp_path / "work", progress
            )
    assert most_at_once[0] == 2
    assert len(started) < len(runs)  # the queue was dropped at the failure
    wall = json.loads((tmp_path / "work/toy/logs/seconds.json").read_text())["students_wall"]
    assert 0.2 <= wall < 0.2 * len(runs)


def test_precompute_benchmark_runs_and_reports_bytes(tmp_path):
    """bench/precompute.py on a tiny teacher: the three passes run and the shards it writes are
    format 2's (bytes per position far below full logits)."""
    import subprocess

    out = tmp_path / "precompute.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench/precompute.py"), "--items", "300", "--users", "16",
         "--seq-len", "8", "--hidden", "32", "--layers", "1", "--topk", "10", "--batch-size", "8",
         "--results", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["precompute_examples_per_s"] > 0
    assert report["bytes_per_position"] < 0.5 * report["full_float32_logits_bytes_per_position"]


def test_large_model_path_on_a_tiny_shape(tmp_path):
    """bench/large_model.py's whole path on a small LLaMA: a checkpoint and tokenizer made with
    save_pretrained, a bf16 ZeRO-3 LoRA teacher with gradient checkpointing killed and resumed,
    ZeRO-3 precompute in prefix mode, check_shards, a LLaMA student cut from the LoRA teacher
    in the teacher's prompt mode with SLMRec alignment, and evaluation; every rank measured."""
    results = tmp_path / "results"
    large_model.main(
        ["--shape", "tiny", "--work", str(tmp_path / "work"), "--results", str(results)]
    )
    report = json.loads((results / "large_model_tiny.json").read_text())
    assert report["teacher_steps_logged"] == [1, 2, 3, 4]  # nothing lost or redone at the resume
    stages = {stage["name"]: stage for stage in report["stages"]}
    for name in ("teacher (killed)", "teacher (resumed)", "precompute", "distill"):
        assert set(stages[name]["peak_rss_gib"]) == {"rank 0", "rank 1"}, name
        assert all(0.05 < gib < 8 for gib in stages[name]["peak_rss_gib"].values()), name
    assert report["student_test"]["count"] == 200 and report["samples"] == 400
    work = tmp_path / "work"
    # the adapters trained under ZeRO-3 (they were once left as empty shards)
    release = load_file(str(work / "teacher/final/model.safetensors"))
    adapters = [tensor for name, tensor in release.items() if "lora_B" in name]
    assert adapters and all(tensor.float().abs().sum() > 0 for tensor in adapters)
    teacher_config = json.loads((work / "teacher/final/teacher_config.json").read_text())
    student_config = json.loads((work / "student/final/student_config.json").read_text())
    assert teacher_config["mode"] == student_config["mode"] == "prefix"
    assert student_config["prompt_prefix_ids"] == teacher_config["prompt_prefix_ids"]
    assert student_config["prompt_prefix_ids"][0] == 1  # the tokenizer's BOS
    records = [
        json.loads(line) for line in (work / "student/metrics.jsonl").read_text().splitlines()
    ]
    assert any("loss/align_cos" in record for record in records)
    assert (results / "large_model_tiny.md").read_text().startswith("# The large-model path")
