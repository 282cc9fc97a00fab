"""The README works as written: the own-log recipe runs end to end on a CSV, every script a command
names exists and answers --help, and the README stays a first-screens document."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pyarrow as pa
import pyarrow.csv as pacsv

from recdistill.trainer.data.synthetic import SyntheticConfig, generate_synthetic

from .conftest import ROOT

README = (ROOT / "README.md").read_text()


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)


def commands(block: str) -> list[list[str]]:
    """Each command of a bash block as words (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out.append(shlex.split(line))
    return out


def test_own_log_recipe_runs_as_written(tmp_path):
    block = README[README.index("<!-- recipe: own log") :]
    recipe = bash_blocks(block)[0]
    first, rest = recipe.split("\n", 1)
    assert first.startswith("LOG=my_log.csv RUN=runs/mylog")
    log = tmp_path / "my_log.csv"
    events = pa.concat_tables(
        generate_synthetic(SyntheticConfig(users=600, items=150, events=15_000))
    )
    events = events.select(["user", "item", "time"]).rename_columns(
        ["user_id", "item_id", "timestamp"]
    )
    pacsv.write_csv(events, log)
    script = f"set -euo pipefail\nLOG={log} RUN={tmp_path / 'run'}\n{rest}"
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "DS_ACCELERATOR": "cpu",
        "ACCELERATE_USE_CPU": "true",
    }
    result = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        "| teacher |" in result.stdout and (tmp_path / "run/student/final/metrics.json").is_file()
    )


def test_every_script_a_readme_command_names_exists_and_has_help():
    scripts = set()
    for block in bash_blocks(README):
        for words in commands(block):
            scripts |= {
                w for w in words if re.fullmatch(r"(trainer|bench|slurm|launcher)/\w+\.(py|sh)", w)
            }
    assert {"trainer/prepare_data.py", "trainer/distill.py", "slurm/pipeline.sh"} <= scripts
    for script in sorted(scripts):
        assert (ROOT / script).is_file(), script
        command = [sys.executable, script] if script.endswith(".py") else ["bash", script]
        result = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0 and len(result.stdout) > 100, (script, result.stderr[-500:])


def test_readme_is_first_screens_only():
    assert len(README.splitlines()) <= 250
    lines = README.splitlines()
    for question in (
        "## Two commands for a fresh machine",
        "## Your own log, step by step",
        "## A 7B teacher on a Slurm GPU cluster",
    ):
        assert lines.index(question) < 120, question  # the three questions, in the first screens
