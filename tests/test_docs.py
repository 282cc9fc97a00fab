"""The documentation cannot drift from the code: every config key of every job is in its docs page
with its default, and every file a doc links to exists."""

from __future__ import annotations

import json
import re

import pytest

from recdistill.trainer.defaults import DISTILL, PRECOMPUTE, TEACHER

from .conftest import ROOT


def flatten(defaults: dict, prefix: str = "") -> dict:
    """Dotted key -> default; an empty dict (a free-form section) is one key."""
    flat = {}
    for key, value in defaults.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def documented(page: str) -> dict:
    text = (ROOT / "docs" / page).read_text()
    table = text[text.index("<!-- config keys:") : text.index("<!-- end config keys -->")]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]*)` \| (.+) \|$", table, flags=re.MULTILINE)
    assert all(meaning.strip() for _, _, meaning in rows), page  # every key explained
    return {key: json.loads(default) for key, default, _ in rows}


@pytest.mark.parametrize(
    "page,defaults",
    [("teacher.md", TEACHER), ("precompute.md", PRECOMPUTE), ("distill.md", DISTILL)],
)
def test_every_config_key_is_documented_with_its_default(page, defaults):
    assert documented(page) == flatten(defaults)


def test_links_in_the_docs_point_at_files_that_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (page.parent / target).exists(), f"{page.name}: link to {target}"
