"""Teacher shards: webdataset tar files of packed samples, their records and the manifest.

One sample = one tar entry `KEY.safetensors`: all of a sample's arrays in one safetensors blob
(a tar entry costs ~1 KB of header and padding, so one entry per array would dominate small
samples). The blob's metadata carries a CRC32 over the arrays' bytes, so a
flipped byte inside a sample is caught by the reader, not only by the checker's sha256.

Shards are planned by example index, independent of the number of ranks: shard group g holds
examples [g * S, (g + 1) * S) and is written by rank g % world. A group is written to `*.tmp`
files that are renamed when complete; then a small record (`group-GGGGGG.json`: files, counts,
bytes, sha256) is written atomically. A group with a valid record is done; anything else of that
group is debris from a kill and is deleted before the group is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

MANIFEST = "manifest.json"
ITEM_TABLE_FILE = "teacher_item_embeddings.safetensors"
SAMPLE_EXT = "safetensors"


class ShardError(ValueError):
    """A shard that is missing, truncated, corrupt or inconsistent with the manifest."""


# ---- samples ---------------------------------------------------------------------------------


def _crc(arrays: dict[str, np.ndarray]) -> str:
    crc = 0
    for name in sorted(arrays):
        crc = zlib.crc32(
            np.ascontiguousarray(arrays[name]).tobytes(), zlib.crc32(name.encode(), crc)
        )
    return f"{crc:08x}"


def encode_sample(arrays: dict[str, np.ndarray]) -> bytes:
    # The checksum is the only metadata entry: safetensors keeps metadata in a hash map with a
    # random order, so a second entry would make the bytes (and shard sha256s) differ by run.
    return st_save(arrays, metadata={"crc32": _crc(arrays)})


def decode_sample(blob: bytes, where: str) -> dict[str, np.ndarray]:
    """The arrays of one sample; raises ShardError naming `where` when it is corrupt."""
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


# ---- files and records -----------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def group_record_path(out_dir: Path, group: int) -> Path:
    return out_dir / f"group-{group:06d}.json"


def group_files(out_dir: Path, group: int) -> list[Path]:
    return sorted(out_dir.glob(f"shard-{group:06d}-*"))


def write_json_atomic(path: Path, data: dict) -> None:
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(scratch, path)


def verify_group(out_dir: Path, group: int, expected_count: int) -> dict | None:
    """The group's record if the group is complete and intact, else None."""
    record_path = group_record_path(out_dir, group)
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    if sum(shard["count"] for shard in record["shards"]) != expected_count:
        return None
    for shard in record["shards"]:
        path = out_dir / shard["file"]
        if (
            not path.is_file()
            or path.stat().st_size != shard["bytes"]
            or sha256_file(path) != shard["sha256"]
        ):
            return None
    return record


def discard_group(out_dir: Path, group: int) -> None:
    """Delete whatever a killed run left of this group."""
    for path in group_files(out_dir, group):
        path.unlink()
    group_record_path(out_dir, group).unlink(missing_ok=True)


# ---- the background writer -------------------------------------------------------------------


class ShardSink:
    """Writes samples on a background thread, so that storage never stalls the teacher.

    `start_group(g)`, `put(key, arrays)` and `end_group()` are queued in order; a group's
    files are renamed from `.tmp` and recorded when its end is processed. Errors of the thread
    surface on the next call of the main thread.
    """

    def __init__(self, out_dir: Path, max_count: int, max_bytes: int, queue_size: int = 64):
        self.out_dir, self.max_count, self.max_bytes = out_dir, max_count, max_bytes
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.samples_written = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"shard writer failed: {self.error}") from self.error

    def start_group(self, group: int) -> None:
        self._check()
        self.queue.put(("start", group))

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        self._check()
        self.queue.put(("sample", (key, arrays)))

    def end_group(self) -> None:
        self._check()
        self.queue.put(("end", None))

    def close(self) -> None:
        self.queue.put(("stop", None))
        self.thread.join()
        self._check()

    def _run(self) -> None:
        import webdataset as wds

        writer = group = None
        files: list[dict] = []
        counts = {"n": 0}

        def finished(tmp_name: str) -> None:  # ShardWriter's post hook: one tar file is complete
            tmp = Path(tmp_name)
            final = tmp.with_name(tmp.name.removesuffix(".tmp"))
            os.replace(tmp, final)
            size = final.stat().st_size
            files.append(
                {
                    "file": final.name,
                    "count": counts["n"],
                    "bytes": size,
                    "sha256": sha256_file(final),
                }
            )
            self.bytes_written += size
            counts["n"] = 0

        try:
            while True:
                kind, payload = self.queue.get()
                if kind == "stop":
                    return
                if self.error is not None:
                    continue  # drain: the main thread will see the error
                if kind == "start":
                    group, files = payload, []
                    pattern = str(self.out_dir / f"shard-{group:06d}-%03d.tar.tmp")
                    # mtime=0: the same samples give byte-identical shards (and sha256s) on any run.
                    writer = wds.ShardWriter(
                        pattern,
                        maxcount=self.max_count,
                        maxsize=self.max_bytes,
                        post=finished,
                        verbose=0,
                        mtime=0,
                    )
                elif kind == "sample":
                    key, arrays = payload
                    # ShardWriter rolls over before writing a sample, so count after the write.
                    writer.write({"__key__": key, SAMPLE_EXT: encode_sample(arrays)})
                    counts["n"] += 1
                    self.samples_written += 1
                elif kind == "end":
                    writer.close()
                    record = {"group": group, "shards": files}
                    write_json_atomic(group_record_path(self.out_dir, group), record)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            self.error = error


# ---- reading and checking --------------------------------------------------------------------


def load_manifest(shard_dir: Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no manifest (was trainer/precompute.py run to the end?)")
    return json.loads(path.read_text())


def iter_tar_samples(path: Path):
    """(key, blob) of each sample of one tar file; ShardError naming the file on damage."""
    import tarfile

    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if ext != SAMPLE_EXT:
                    raise ShardError(f"{path}: unexpected entry {member.name!r}")
                yield key, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"{path}: unreadable tar ({type(error).__name__}: {error})") from None


def check_shard(path: Path, record: dict) -> list[str]:
    """Problems of one shard file against its manifest record (empty list: the shard is fine)."""
    if not path.is_file():
        return [f"{path}: missing"]
    problems = []
    if path.stat().st_size != record["bytes"]:
        problems.append(
            f"{path}: {path.stat().st_size} bytes, manifest says {record['bytes']} (truncated?)"
        )
    if sha256_file(path) != record["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest")
    count = 0
    try:
        for key, blob in iter_tar_samples(path):
            decode_sample(blob, f"{path}:{key}")
            count += 1
    except ShardError as error:
        problems.append(str(error))
    else:
        if count != record["count"]:
            problems.append(f"{path}: {count} samples, manifest says {record['count']}")
    return problems
