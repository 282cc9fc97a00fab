"""Wheels for a GPU machine that cannot reach a package index (an air-gapped cluster node).

    python -m recdistill.launcher.wheelhouse --out .whl --have target_freeze.txt
    # on the GPU machine, its own torch already installed:
    pip install --no-index --find-links .whl -r .whl/requirements.txt

Which wheels: recdistill's requirements and theirs, at the versions installed here (the ones the
tests ran with), less what the target already has (--have: its `pip freeze`, or bare names, one
a line; what a package it has needs, it has too). torch is always the target's own: its build
must match the target's CUDA. Wheels are fetched for the target's Python and Linux x86-64
(`pip download`); a package published only as an sdist (DeepSpeed: its CUDA ops are compiled
just in time on the target) is built into a wheel here with `pip wheel`.

The folder gets requirements.txt: the pinned packages the target lacks that recdistill asks for
directly. `pip install --no-index --find-links` then keeps a package the target has when its
version satisfies every requirement and takes the wheel from the folder otherwise (--include puts
such fallbacks in, e.g. a newer pyarrow than the target might have).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ALWAYS_PROVIDED = {"torch"}  # the target's own CUDA build
PLATFORMS = [  # pip matches each manylinux tag exactly: the common ones, newest first
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def read_have(path: Path) -> set[str]:
    """Package names of a `pip freeze` / `pip list --format=freeze` file, or of bare names."""
    names = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split("==", 1)[0].split(" @ ", 1)[0].strip()
        if not name or " " in name:
            raise SystemExit(f"{path}:{number}: expected NAME or NAME==VERSION, got {line!r}")
        names.add(canonicalize_name(name))
    return names


def applies(requirement: Requirement, python_version: str, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0"}
    return any(requirement.marker.evaluate({**environment, "extra": e}) for e in extras | {""})


def installed_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        raise SystemExit(
            f"wheelhouse: {name} (needed by recdistill or asked for) is not installed here; "
            "run `make install`"
        ) from None


def needed_packages(
    roots: list[Requirement], have: set[str], python_version: str, extras: set[str]
) -> tuple[dict[str, str], list[str]]:
    """{name: version installed here} of every package reached from `roots` (recdistill's
    requirements, its `extras` asked for) that the target lacks, not descending into what it
    has; and the roots among them."""
    provided = have | ALWAYS_PROVIDED
    needed: dict[str, str] = {}
    direct = []
    # (requirement, the extras its marker is evaluated with: those asked of the package needing it)
    pending = [(requirement, extras, True) for requirement in roots]
    while pending:
        requirement, asked, is_root = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in provided or not applies(requirement, python_version, asked):
            continue
        if is_root and name not in direct:
            direct.append(name)
        if name in needed:
            continue
        needed[name] = installed_version(name)
        pending += [
            (Requirement(text), set(requirement.extras), False)
            for text in metadata.requires(name) or []
        ]
    return needed, direct


def fetch(name: str, version: str, out: Path, python_version: str) -> str:
    """A wheel of name==version for the target in `out`: downloaded, else built from its sdist
    (which must give a pure-Python wheel: one built for this machine's Python would not do)."""
    pin = f"{name}=={version}"
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    download += ["--only-binary=:all:", "--python-version", python_version, *platforms]
    download += ["--implementation", "cp", "-d", str(out), pin]
    downloaded = subprocess.run(download, capture_output=True, text=True)
    if downloaded.returncode == 0:
        return "downloaded"
    # No wheel for the target: build one (with this environment's torch for setup scripts that
    # import it, as DeepSpeed's does) into a scratch folder, and keep it only if pure Python.
    scratch = out / ".build"
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
    build += ["--no-build-isolation", "-w", str(scratch), pin]
    built = subprocess.run(build, capture_output=True, text=True)
    wheels = list(scratch.glob("*.whl"))
    try:
        if built.returncode != 0 or len(wheels) != 1:
            raise SystemExit(
                f"wheelhouse: {pin}: no wheel for the target and building one failed:\n"
                f"{downloaded.stderr}{built.stderr}"
            )
        if not wheels[0].name.endswith("-none-any.whl"):
            raise SystemExit(
                f"wheelhouse: {pin}: pip found no wheel for Python {python_version} on Linux "
                f"x86-64, and the one built here ({wheels[0].name}) is for this machine only:\n"
                f"{downloaded.stderr}"
            )
        wheels[0].replace(out / wheels[0].name)
    finally:
        for wheel in wheels:
            wheel.unlink(missing_ok=True)
        if scratch.is_dir():
            scratch.rmdir()
    return "built"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="the wheel folder to fill (created)")
    parser.add_argument(
        "--have", help="the target's packages: its `pip freeze` output, or one name a line"
    )
    parser.add_argument(
        "--include",
        nargs="*",
        default=[],
        help="also fetch these (at the version installed here) as fallbacks the target may need",
    )
    parser.add_argument(
        "--extras", nargs="*", default=[], help="recdistill extras to include (e.g. bench)"
    )
    parser.add_argument("--python-version", default="3.12", help="the target's Python (3.12)")
    args = parser.parse_args(argv)

    have = read_have(Path(args.have)) if args.have else set()
    roots = [Requirement(text) for text in metadata.requires("recdistill") or []]
    needed, direct = needed_packages(roots, have, args.python_version, set(args.extras))
    for name in map(canonicalize_name, args.include):
        needed.setdefault(name, installed_version(name))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, version in sorted(needed.items()):
        print(f"wheelhouse: {name}=={version} {fetch(name, version, out, args.python_version)}")
    pins = [f"{name}=={needed[name]}\n" for name in sorted(direct)]
    (out / "requirements.txt").write_text("".join(pins))
    megabytes = sum(path.stat().st_size for path in out.glob("*.whl")) / 2**20
    print(
        f"wheelhouse: {len(needed)} packages, {megabytes:.1f} MiB in {out}; on the target: "
        f"pip install --no-index --find-links {out} -r {out}/requirements.txt"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
