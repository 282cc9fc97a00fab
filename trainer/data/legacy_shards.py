"""Format 1 of the teacher shards (`recdistill-teacher-shards/1`), read only to convert it.

One tar entry per sample, `KEY.safetensors`, whose metadata holds a CRC32 of the arrays; the
arrays include `confidence` (= logsumexp[:, :1] - topk_scores, which format 2 derives instead)
and int32 item ids. `encode_sample` is kept for tests and for bench/speed.py's baseline, which
measure format 2 against the same samples in this layout.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from recdistill.trainer.data.shards import ShardError, load_manifest, sha256_file
from recdistill.trainer.data.shards import iter_samples as iter_samples_v2

FORMAT_V1 = "recdistill-teacher-shards/1"
SAMPLE_EXT = "safetensors"


def _crc(arrays: dict[str, np.ndarray]) -> str:
    crc = 0
    for name in sorted(arrays):
        crc = zlib.crc32(
            np.ascontiguousarray(arrays[name]).tobytes(), zlib.crc32(name.encode(), crc)
        )
    return f"{crc:08x}"


def encode_sample(arrays: dict[str, np.ndarray]) -> bytes:
    return st_save(arrays, metadata={"crc32": _crc(arrays)})


def decode_sample(blob: bytes, where: str) -> dict[str, np.ndarray]:
    """The arrays of one format-1 sample; raises ShardError naming `where` when it is corrupt."""
    try:
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + header_len]).get("__metadata__", {})
        arrays = st_load(blob)
    except Exception as error:  # safetensors raises several types on garbage
        raise ShardError(
            f"{where}: sample cannot be decoded ({type(error).__name__}: {error})"
        ) from None
    if meta.get("crc32") != _crc(arrays):
        raise ShardError(f"{where}: sample checksum mismatch (corrupt data)")
    return arrays


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(key, arrays) of each sample of one format-1 tar file, checked."""
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if ext != SAMPLE_EXT:
                    raise ShardError(f"{path}: unexpected entry {member.name!r}")
                yield key, decode_sample(tar.extractfile(member).read(), f"{path}:{key}")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"{path}: unreadable tar ({type(error).__name__}: {error})") from None


def to_format2(arrays: dict[str, np.ndarray], ids: np.dtype) -> dict[str, np.ndarray]:
    """A format-1 sample's arrays as format 2 stores them: no confidence, narrow item ids."""
    out = {name: value for name, value in arrays.items() if name != "confidence"}
    for name in ("item_ids", "targets", "topk_ids"):
        out[name] = out[name].astype(ids)
    return out


def write_format1(src: Path, dst: Path) -> None:
    """The format-1 folder earlier versions wrote for the teacher outputs of format-2 folder
    `src`: one blob per sample with int32 ids and the stored confidence, the same groups, files
    and manifest fields (for tests of the conversion and bench/data_path.py's baseline)."""
    import webdataset as wds

    manifest = load_manifest(src)
    dst.mkdir(parents=True)
    shards = []
    for shard in manifest["shards"]:
        with wds.TarWriter(str(dst / shard["file"]), mtime=0) as writer:
            for key, arrays in iter_samples_v2(src / shard["file"]):
                arrays = dict(arrays)
                arrays["confidence"] = (arrays["logsumexp"][:, :1] - arrays["topk_scores"]).astype(
                    np.float16
                )
                for name in ("item_ids", "targets", "topk_ids"):
                    arrays[name] = arrays[name].astype(np.int32)
                writer.write({"__key__": key, SAMPLE_EXT: encode_sample(arrays)})
        path = dst / shard["file"]
        shards.append(
            {
                "file": shard["file"],
                "count": shard["count"],
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    old = {k: v for k, v in manifest.items() if k not in ("block_size", "compression")}
    old.update(format=FORMAT_V1, shards=shards, bytes=sum(s["bytes"] for s in shards))
    old["dtypes"] = {
        **manifest["dtypes"],
        "item_ids": "int32",
        "topk_ids": "int32",
        "confidence": "float16",
    }
    (dst / "manifest.json").write_text(json.dumps(old, indent=2) + "\n")
    shutil.copy2(src / manifest["item_table"], dst / manifest["item_table"])
