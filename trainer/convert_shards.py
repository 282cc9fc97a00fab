"""Convert a folder of format-1 teacher shards (one blob per sample) to format 2 (columnar blocks).

    python trainer/convert_shards.py runs/old/shards runs/old/shards-v2 [--block-size 256] [--compression zstd]

No teacher is loaded: every stored field is carried over (item ids narrowed to uint16 when the
catalogue allows), `confidence` is dropped (format 2 derives it from the scores and the
log-sum-exp), and the samples keep their groups and order, so the result is what
trainer/precompute.py would have written for the same teacher. Samples are checked while read
(a damaged one stops the conversion, naming its shard). The new folder is written beside the
output under a temporary name and renamed when complete; an existing output is never touched.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from recdistill.trainer.data.legacy_shards import FORMAT_V1, iter_samples, to_format2
from recdistill.trainer.data.shards import (
    COMPRESSIONS,
    FORMAT,
    MANIFEST,
    ShardError,
    ShardSink,
    id_dtype,
    verify_group,
    write_json_atomic,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="folder of format-1 shards (with manifest.json)")
    parser.add_argument(
        "output", type=Path, help="new folder for the format-2 shards (must not exist)"
    )
    parser.add_argument(
        "--block-size",
        type=int,
        help="samples per block (default: a whole group, one block per file, as precompute writes)",
    )
    parser.add_argument(
        "--compression", choices=COMPRESSIONS, default="none", help="per-block compression"
    )
    return parser.parse_args(argv)


def group_of(file: str) -> int:
    """shard-GGGGGG-NNN.tar -> G."""
    return int(file.split("-")[1])


def convert(source: Path, output: Path, block_size: int | None, compression: str) -> dict:
    manifest = json.loads((source / MANIFEST).read_text())
    if manifest.get("format") != FORMAT_V1:
        raise ShardError(
            f"{source / MANIFEST}: format {manifest.get('format')!r}, not {FORMAT_V1!r}"
        )
    if output.exists():
        raise ShardError(f"{output}: already exists; choose a new folder")
    staging = output.with_name(output.name + ".converting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ids = id_dtype(manifest["num_items"])
    groups: dict[int, list[dict]] = {}
    for shard in manifest["shards"]:
        groups.setdefault(group_of(shard["file"]), []).append(shard)
    per_group = manifest["examples_per_group"]
    block_size = block_size or per_group
    sink = ShardSink(
        staging,
        max_blocks=-(-per_group // block_size),
        max_bytes=2**62,
        block_size=block_size,
        compression=compression,
    )
    progress = tqdm(total=manifest["examples"], desc="converting", unit="sample")
    for group, shards in sorted(groups.items()):
        sink.start_group(group)
        for shard in shards:
            for key, arrays in iter_samples(source / shard["file"]):
                sink.put(key, to_format2(arrays, ids))
                progress.update(1)
        sink.end_group()
    sink.close()
    progress.close()
    records = []
    for group, shards in sorted(groups.items()):
        record = verify_group(staging, group, sum(s["count"] for s in shards))
        if record is None:
            raise ShardError(f"{source}: group {group} did not convert completely")
        records.append(record)
    new_shards = [shard for record in records for shard in record["shards"]]
    dtypes = {k: v for k, v in manifest["dtypes"].items() if k != "confidence"}
    dtypes.update(item_ids=str(ids), topk_ids=str(ids))
    converted = {
        **manifest,
        "format": FORMAT,
        "block_size": block_size,
        "compression": compression,
        "dtypes": dtypes,
        "bytes": sum(shard["bytes"] for shard in new_shards),
        "shards": new_shards,
        "converted_from": {
            "path": str(source.resolve()),
            "format": FORMAT_V1,
            "bytes": manifest["bytes"],
        },
    }
    for extra in (manifest["item_table"], "precompute_config.yaml"):
        if (source / extra).is_file():
            shutil.copy2(source / extra, staging / extra)
    write_json_atomic(staging / MANIFEST, converted)
    staging.rename(output)
    return converted


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        manifest = convert(args.source, args.output, args.block_size, args.compression)
    except (ShardError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    old = manifest["converted_from"]["bytes"]
    print(
        json.dumps(
            {
                "examples": manifest["examples"],
                "bytes_before": old,
                "bytes_after": manifest["bytes"],
                "bytes_per_position_before": round(old / manifest["positions"], 1),
                "bytes_per_position_after": round(manifest["bytes"] / manifest["positions"], 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
