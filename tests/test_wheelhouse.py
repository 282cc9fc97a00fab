"""Which packages a machine without a package index needs (launcher/wheelhouse.py), worked out
from the packages installed here."""

from __future__ import annotations

from importlib import metadata

import pytest
from packaging.requirements import Requirement

from recdistill.launcher.wheelhouse import needed_packages, read_have

# What datasets asks for, less dill and multiprocess (multiprocess needs dill).
DATASETS_DEPS_THE_TARGET_HAS = {
    "filelock",
    "numpy",
    "pyarrow",
    "pandas",
    "tqdm",
    "xxhash",
    "fsspec",
    "huggingface-hub",
    "packaging",
    "pyyaml",
}


def test_needed_stops_at_what_the_target_has():
    needed, direct = needed_packages(
        [Requirement("datasets>=3.0"), Requirement("torch>=2.3")],
        DATASETS_DEPS_THE_TARGET_HAS,
        "3.12",
        set(),
    )
    assert needed == {name: metadata.version(name) for name in ("datasets", "dill", "multiprocess")}
    assert direct == ["datasets"]  # torch is always the target's own build


def test_markers_follow_the_target_python_and_the_extras_asked():
    old_python_only = Requirement('webdataset; python_version < "3.0"')
    assert needed_packages([old_python_only], set(), "3.12", set()) == ({}, [])
    bench_extra = Requirement('braceexpand; extra == "bench"')
    assert needed_packages([bench_extra], set(), "3.12", set()) == ({}, [])
    needed, direct = needed_packages([bench_extra], set(), "3.12", {"bench"})
    assert needed == {"braceexpand": metadata.version("braceexpand")} and direct == ["braceexpand"]


def test_a_requirement_not_installed_here_is_named():
    with pytest.raises(SystemExit, match="no-such-package-xyz"):
        needed_packages([Requirement("no-such-package-xyz")], set(), "3.12", set())


def test_have_file_takes_freeze_output_or_names(tmp_path):
    have = tmp_path / "have.txt"
    have.write_text(
        "# pip freeze of the target\nNumPy==2.5.2\ntorch @ file:///wheels/torch.whl\n\nPyYAML\n"
    )
    assert read_have(have) == {"numpy", "torch", "pyyaml"}
    have.write_text("numpy==2.5.2\nnot a package line\n")
    with pytest.raises(SystemExit, match=r"have.txt:2: expected NAME"):
        read_have(have)
