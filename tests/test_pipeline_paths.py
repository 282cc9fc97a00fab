"""slurm/pipeline.sh and the 7B configs agree: every script and config it names exists, every job's
config with the overrides it gets loads under that job's defaults, and each stage reads what the
one before writes (all paths from one file, slurm/paths.env)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from recdistill.trainer.config import load_config
from recdistill.trainer.defaults import DISTILL, PRECOMPUTE, TEACHER

from .conftest import ROOT

DEFAULTS = {"teacher.sh": TEACHER, "precompute.sh": PRECOMPUTE, "distill.sh": DISTILL}


def dry_run(*args: str, env: dict | None = None) -> dict[str, tuple[list[str], dict]]:
    """{sbatch script: (sbatch options, its config loaded with the overrides)} of a dry run."""
    result = subprocess.run(
        ["bash", "slurm/pipeline.sh", "--dry-run", *args],
        cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = {}
    for line in result.stdout.splitlines():
        words = shlex.split(line)
        script_at = next(i for i, w in enumerate(words) if w.startswith("slurm/"))
        script, config, overrides = words[script_at], words[script_at + 1], words[script_at + 2 :]
        assert (ROOT / script).is_file() and (ROOT / config).is_file(), (script, config)
        name = Path(script).name
        jobs[name] = (words[1:script_at], load_config(ROOT / config, overrides, DEFAULTS[name]))
    return jobs


def test_every_stage_reads_what_the_one_before_writes(tmp_path):
    paths = tmp_path / "paths.env"
    paths.write_text(
        "RECDISTILL_DATA=/data/x\nRECDISTILL_BASE_MODEL=/models/m\nRECDISTILL_RUNS=/runs\n"
    )
    jobs = dry_run("--paths", str(paths), "--distill-nodes", "2", "--time=1:00:00")
    assert list(jobs) == ["teacher.sh", "precompute.sh", "distill.sh"]
    teacher, precompute, distill = (jobs[name][1] for name in jobs)
    assert (
        teacher["data"]["dir"] == precompute["data"]["dir"] == distill["data"]["dir"] == "/data/x"
    )
    assert teacher["model"]["backbone_path"] == "/models/m"
    assert precompute["teacher"] == f"{teacher['train']['output_dir']}/final"
    assert distill["shards"]["dir"] == precompute["output_dir"]
    assert teacher["data"]["mode"] == precompute["data"]["mode"]
    assert teacher["data"]["max_len"] == precompute["data"]["max_len"] == distill["data"]["max_len"]
    assert all(
        p.startswith("/runs/") for p in (precompute["output_dir"], distill["train"]["output_dir"])
    )
    # node counts are per stage; other sbatch options reach all three
    assert [options for options, _ in jobs.values()] == [
        ["--nodes=8", "--time=1:00:00"],
        ["--nodes=8", "--time=1:00:00"],
        ["--nodes=2", "--time=1:00:00"],
    ]


def test_configs_name_no_paths_of_their_own():
    """The paths live in slurm/paths.env only: the 7B configs leave them unset."""
    for config, keys in [
        ("configs/teacher_llama7b.yaml", ["data.dir", "model.backbone_path", "train.output_dir"]),
        ("configs/precompute_llama7b.yaml", ["teacher", "data.dir", "output_dir"]),
        ("configs/distill_sasrec.yaml", ["data.dir", "shards.dir", "train.output_dir"]),
    ]:
        loaded = load_config(ROOT / config)
        for key in keys:
            value = loaded
            for part in key.split("."):
                value = value[part]
            assert value is None, (config, key)


def test_environment_overrides_the_paths_file():
    jobs = dry_run(env={"RECDISTILL_RUNS": "/elsewhere"})
    assert jobs["distill.sh"][1]["train"]["output_dir"].startswith("/elsewhere/")
