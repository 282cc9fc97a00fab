"""Verify a folder of teacher shards against its manifest.

    python trainer/check_shards.py runs/demo/shards

Checks every shard the manifest lists: present, size, sha256, every sample decodable with a
matching checksum, sample counts; and that no stray tar files sit beside them. Prints one line
per problem naming the shard, and exits 1 if there is any (0 when all is well).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from recdistill.trainer.data.shards import ShardError, check_shard, load_manifest


def check_dir(shard_dir: Path, progress: bool = True) -> list[str]:
    manifest = load_manifest(shard_dir)
    problems = []
    listed = {shard["file"] for shard in manifest["shards"]}
    for shard in tqdm(
        manifest["shards"], desc="checking shards", unit="shard", disable=not progress
    ):
        problems += check_shard(shard_dir / shard["file"], shard)
    for stray in sorted(p.name for p in shard_dir.glob("*.tar*")):
        if stray not in listed:
            problems.append(f"{shard_dir / stray}: not in the manifest")
    counted = sum(shard["count"] for shard in manifest["shards"])
    if counted != manifest["examples"]:
        problems.append(
            f"{shard_dir / 'manifest.json'}: shards hold {counted} samples, manifest says {manifest['examples']}"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shard_dir", help="folder with manifest.json and the shards")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        problems = check_dir(Path(args.shard_dir), progress=not args.quiet)
    except ShardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"BAD {problem}", file=sys.stderr)
    manifest = json.loads((Path(args.shard_dir) / "manifest.json").read_text())
    print(
        json.dumps(
            {
                "shards": len(manifest["shards"]),
                "examples": manifest["examples"],
                "problems": len(problems),
            }
        )
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
