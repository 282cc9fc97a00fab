"""Job configs: a YAML or JSON file plus `key.sub=value` overrides from the command line."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import yaml

from recdistill.trainer.errors import JobError


class ConfigError(JobError):
    """A config file, key or override that is wrong, named in the message."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; configs mean a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_config(
    path: str | Path, overrides: list[str] | None = None, defaults: dict | None = None
) -> dict:
    """Read a config file, lay it over `defaults` and apply overrides such as `train.lr=3e-4`.

    Override values are parsed as YAML, so `x=3`, `x=true`, `x=[1,2]` and `x=null` get types.
    An override or file key that is not in `defaults` is an error (catches typos) when defaults
    are given.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        loaded = json.loads(text) if path.suffix == ".json" else _yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot parse: {error}") from None
    config = copy.deepcopy(defaults) if defaults else {}
    # Sections whose default is an empty dict are free-form (an HF backbone config, a student's
    # options): any key may be added there, by the file or by an override.
    free_form = _empty_sections(defaults or {})
    _merge(config, loaded or {}, str(path), strict=defaults is not None, free_form=free_form)
    for override in overrides or []:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected key.sub=value")
        value = _yaml(raw) if raw else None
        nested: dict = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _merge(
            config,
            nested,
            f"override {override!r}",
            strict=defaults is not None,
            free_form=free_form,
        )
    return config


def _empty_sections(defaults: dict, prefix: str = "") -> set[str]:
    found = set()
    for key, value in defaults.items():
        if isinstance(value, dict):
            found |= {f"{prefix}{key}"} if not value else _empty_sections(value, f"{prefix}{key}.")
    return found


def _merge(
    base: dict,
    update: dict,
    where: str,
    strict: bool,
    prefix: str = "",
    free_form: frozenset | set = frozenset(),
) -> None:
    for key, value in update.items():
        name = f"{prefix}{key}"
        parent = prefix.rstrip(".")
        inside_free_form = any(parent == f or parent.startswith(f"{f}.") for f in free_form)
        if strict and key not in base and not inside_free_form:
            raise ConfigError(f"{where}: unknown key {name!r} (known: {', '.join(sorted(base))})")
        if isinstance(value, dict) and isinstance(base.get(key), dict) and base.get(key):
            _merge(base[key], value, where, strict, f"{name}.", free_form)
        else:
            base[key] = copy.deepcopy(value)


def parse_job_args(
    description: str,
    job: str,
    override_example: str,
    argv: list[str] | None = None,
    resume: bool = True,
    deepspeed: bool = False,
):
    """The command line every config-driven job shares: --config, --check, [--resume], overrides
    (and the `--local_rank` the deepspeed launcher adds)."""
    import argparse

    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        required=True,
        help=f"job config (YAML or JSON), e.g. configs/{job}_demo.yaml; keys: docs/{job}.md",
    )
    if resume:
        parser.add_argument(
            "--resume",
            action="store_true",
            help="continue from the latest checkpoint in OUTPUT/checkpoints",
        )
    if deepspeed:
        parser.add_argument(
            "--local_rank", type=int, default=-1, help="set by the deepspeed launcher"
        )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check the config and inputs (paths, vocabularies, output folder), then exit: "
        "0 and one line when all is well, 2 and one error line otherwise",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help=f"config overrides, e.g. {override_example}; every key and its default: docs/{job}.md",
    )
    return parser.parse_args(argv)


def checked_config(args, defaults: dict, check_inputs) -> dict | None:
    """The job's config with its inputs checked (`check_inputs(cfg)` raises a JobError or
    returns a summary); None after `--check`, which prints `ok: SUMMARY`."""
    cfg = load_config(args.config, args.overrides, defaults)
    summary = check_inputs(cfg)
    if args.check:
        print(f"ok: {summary}")
        return None
    return cfg


def save_config(config: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))


def start_run_dir(output_dir: Path, config: dict, resume: bool) -> None:
    """Create a training job's output folder and record its config; a finished run there is never
    overwritten unless the job resumes it."""
    if (output_dir / "final").exists() and not resume:
        raise SystemExit(
            f"{output_dir}: a finished run is there; use another train.output_dir (or --resume)"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "run_config.yaml")


def main(argv: list[str] | None = None) -> int:
    """`python -m recdistill.trainer.config CONFIG KEY [overrides...]`: print one value (the
    sbatch scripts read output folders this way)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(
            "usage: python -m recdistill.trainer.config CONFIG KEY [key=value ...]", file=sys.stderr
        )
        return 2
    value = load_config(argv[0], argv[2:])
    for part in argv[1].split("."):
        if not isinstance(value, dict) or part not in value:
            print(f"{argv[0]}: no key {argv[1]!r}", file=sys.stderr)
            return 2
        value = value[part]
    print(value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
