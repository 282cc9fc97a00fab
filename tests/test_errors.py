"""Bad inputs end a job with one line naming the file, key or shard, exit code 2: from the jobs'
`--check` (no ranks started) and from the demo, which checks each launched stage first."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from recdistill.launcher import demo

from .conftest import ROOT


def check(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), "--check", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"},
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """What a person reads: every stderr line but the library warnings of an import."""
    return [line for line in result.stderr.splitlines() if "[WARNING]" not in line]


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("other") / "data"
    subprocess.run(
        [sys.executable, str(ROOT / "trainer/prepare_data.py"), "--format", "synthetic",
         "--users", "300", "--items", "60", "--events", "6000", "--output", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def test_distill_check_passes_and_names_a_vocabulary_mismatch(pipeline, other_data, tmp_path):
    common = ["--config", "configs/distill_demo.yaml", f"shards.dir={pipeline['shards']}"]
    good = check("trainer/distill.py", *common, f"data.dir={pipeline['data']}",
                 f"train.output_dir={tmp_path / 'run'}")  # fmt: skip
    assert good.returncode == 0 and good.stdout.startswith("ok: "), good.stderr
    assert not (tmp_path / "run").exists()  # a check writes nothing
    bad = check("trainer/distill.py", *common, f"data.dir={other_data}",
                f"train.output_dir={tmp_path / 'run'}")  # fmt: skip
    assert bad.returncode == 2
    assert error_lines(bad) == [error_lines(bad)[0]] and "another item vocabulary" in bad.stderr


@pytest.mark.parametrize(
    "script,args,expected",
    [
        ("trainer/distill.py", ["train.lr_schedul=linear"], "unknown key 'train.lr_schedul'"),
        ("trainer/distill.py", ["shards.dir=/nonexistent"], "/nonexistent/manifest.json: no manifest"),
        ("trainer/distill.py", ["student.architecture=bert"], "student.architecture 'bert': use one of"),
        ("trainer/distill.py", ["shards.map_files=maybe"], "shards.map_files 'maybe': use one of True, False"),
        ("trainer/teacher.py", ["train.deepspeed_config=ds_configs/none.json"], "ds_configs/none.json: no such file"),
        ("trainer/teacher.py", ["data.dir=/nonexistent"], "not a prepared data folder"),
        ("trainer/precompute.py", ["teacher=/nonexistent"], "teacher /nonexistent: no such folder"),
        ("trainer/precompute.py", ["compression=lz4"], "compression 'lz4': use one of none, zstd"),
        ("trainer/precompute.py", ["shard_size=10XB"], "shard_size '10XB': write a size such as 10MB"),
        ("trainer/precompute.py", ["shard_size=0"], "shard_size 0: a count of examples (1000) or a size"),
        ("trainer/precompute.py", ["shard_size=10MB", "min_shards=0"], "min_shards 0: a count of at least 1"),
    ],
)  # fmt: skip
def test_checks_name_the_bad_key_or_path(pipeline, tmp_path, script, args, expected):
    config = {
        "trainer/distill.py": ["configs/distill_demo.yaml", f"data.dir={pipeline['data']}",
                               f"shards.dir={pipeline['shards']}", f"train.output_dir={tmp_path / 'd'}"],
        "trainer/teacher.py": ["configs/teacher_demo.yaml", f"data.dir={pipeline['data']}",
                               f"train.output_dir={tmp_path / 't'}"],
        "trainer/precompute.py": ["configs/precompute_demo.yaml", f"data.dir={pipeline['data']}",
                                  f"teacher={pipeline['teacher'] / 'final'}", f"output_dir={tmp_path / 'p'}"],
    }[script]  # fmt: skip
    result = check(script, "--config", *config, *args)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]


def test_a_finished_run_is_not_rerun_without_resume(pipeline, tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    result = check("trainer/distill.py", "--config", "configs/distill_demo.yaml",
                   f"data.dir={pipeline['data']}", f"shards.dir={pipeline['shards']}",
                   f"train.output_dir={run}")  # fmt: skip
    assert result.returncode == 2 and "a finished run is there" in result.stderr


def test_demo_stops_at_a_bad_stage_with_its_one_line(pipeline, other_data, tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    shutil.copytree(other_data, out / "data")  # data of another vocabulary than the teacher's
    shutil.copytree(pipeline["teacher"], out / "teacher")
    with pytest.raises(SystemExit) as stop:
        demo.precompute_stage(out, {"stages": {}, "metrics": {}})
    message = str(stop.value)
    assert (
        message.startswith("demo: stage 'precompute': error: ")
        and "another item vocabulary" in message
    )
    assert "\n" not in message and not (out / "shards").exists()


def test_demo_says_a_stage_is_skipped_and_keeps_its_seconds(pipeline, tmp_path, capsys):
    out = tmp_path / "demo"
    shutil.copytree(pipeline["data"], out / "data")
    demo.PREVIOUS.clear()
    demo.PREVIOUS.update({"stages": {"data": {"seconds": 12.5}}})
    report = {"stages": {}, "metrics": {}}
    demo.data_stage(out, report)
    assert "data: already done" in capsys.readouterr().out
    assert report["stages"]["data"]["seconds"] == 12.5
    demo.PREVIOUS.clear()


def test_gap_closed_in_the_report():
    metrics = {"teacher": {"ndcg@10": 0.5}, "student_plain": {"ndcg@10": 0.4},
               "student_kl": {"ndcg@10": 0.46}}  # fmt: skip
    assert demo.gap_closed(metrics, "student_kl") == "+60%"
    assert demo.gap_closed(metrics, "student_plain") == "" == demo.gap_closed(metrics, "teacher")
    behind = {**metrics, "teacher": {"ndcg@10": 0.3}}
    assert demo.gap_closed(behind, "student_kl") == "teacher does not lead"
