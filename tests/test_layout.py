"""The code's layout: jobs in trainer/ are entry points only (no job imports another job, and no
benchmark imports a job); what they share lives in library modules, whose imports have no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

JOB_NAMES = [
    "prepare_data",
    "item_features",
    "teacher",
    "precompute",
    "check_shards",
    "convert_shards",
    "distill",
    "evaluate",
]
JOBS = {f"recdistill.trainer.{name}" for name in JOB_NAMES}
LIBRARY_CLIS = {
    "config"
}  # `python -m recdistill.trainer.config FILE KEY`: the sbatch scripts' reader
PACKAGES = {
    "trainer": "recdistill.trainer",
    "models": "recdistill.models",
    "launcher": "recdistill.launcher",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] not in PACKAGES:
        return "/".join(parts)  # bench scripts, tests: not importable modules
    name = ".".join((PACKAGES[parts[0]], *parts[1:]))
    return name.removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """recdistill modules `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("recdistill")
        ):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("recdistill")}
    return found


def sources() -> list[Path]:
    return [
        path
        for folder in ("trainer", "models", "launcher", "bench")
        for path in (ROOT / folder).rglob("*.py")
    ]


def test_jobs_are_entry_points_only():
    scripts = {
        p.stem
        for p in (ROOT / "trainer").glob("*.py")
        if '\nif __name__ == "__main__":' in p.read_text()
    }
    assert scripts - LIBRARY_CLIS == set(JOB_NAMES)  # a new job is added to the list above
    edges = [
        (module_name(path), target)
        for path in sources()
        for target in imports(path) & JOBS
        if target != module_name(path)
    ]
    assert edges == [], f"job modules imported by others: {edges}"


def test_library_imports_have_no_cycle():
    modules = {module_name(p): p for p in sources() if not module_name(p).count("/")}
    graph = {name: imports(path) & set(modules) for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*trail, name])}")
        if state.get(name) == 2:
            return
        state[name] = 1
        for target in sorted(graph[name] - {name}):
            visit(target, [*trail, name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])
