"""Every shipped config parses against its job's defaults; overrides get types; typos are errors."""

from __future__ import annotations

import pytest

from recdistill.trainer.config import ConfigError, load_config
from recdistill.trainer.defaults import DISTILL, PRECOMPUTE, TEACHER

from .conftest import ROOT

JOBS = {"teacher": TEACHER, "precompute": PRECOMPUTE, "distill": DISTILL}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    job = path.name.split("_")[0]
    config = load_config(path, [], JOBS[job])
    assert config  # every key known to the job (load_config raises on unknown keys)


def test_overrides_are_typed_and_checked(tmp_path):
    config = load_config(
        ROOT / "configs/teacher_demo.yaml",
        ["train.lr=3e-4", "model.lora={r: 4}", "train.max_steps=null"],
        TEACHER,
    )
    assert (
        config["train"]["lr"] == 3e-4
        and config["model"]["lora"] == {"r": 4}
        and config["train"]["max_steps"] is None
    )
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        load_config(ROOT / "configs/teacher_demo.yaml", ["train.lrr=1"], TEACHER)
    # The backbone is an HF config (free-form): new keys are allowed there, typos elsewhere not.
    config = load_config(
        ROOT / "configs/teacher_demo.yaml", ["model.backbone.initializer_range=0.1"], TEACHER
    )
    assert config["model"]["backbone"]["initializer_range"] == 0.1
    assert config["model"]["backbone"]["hidden_size"] == 64  # the file's keys are kept
    with pytest.raises(ConfigError, match="unknown key 'model.item_dimm'"):
        load_config(ROOT / "configs/teacher_demo.yaml", ["model.item_dimm=8"], TEACHER)
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: cannot parse"):
        load_config(tmp_path / "bad.yaml", [], TEACHER)


def test_unknown_lr_schedule_is_refused_before_any_work(tmp_path):
    from recdistill.trainer.distill import main as distill_main

    output = tmp_path / "run"
    with pytest.raises(ConfigError, match="train.lr_schedule 'step': use one of linear, cosine"):
        distill_main(
            [
                "--config",
                str(ROOT / "configs/distill_demo.yaml"),
                "train.lr_schedule=step",
                f"train.output_dir={output}",
            ]
        )
    assert not output.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["shards.gather=gpu"], "shards.gather 'gpu': use one of host, device"),
        (["shards.gather=device", "shards.workers=2"], "set shards.workers=0"),
    ],
)
def test_gathering_on_the_device_is_checked_before_any_work(tmp_path, overrides, message):
    from recdistill.trainer.distill import main as distill_main

    output = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        distill_main(
            [
                "--config",
                str(ROOT / "configs/distill_demo.yaml"),
                *overrides,
                f"train.output_dir={output}",
            ]
        )
    assert not output.exists()
