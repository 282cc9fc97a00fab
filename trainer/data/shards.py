"""Teacher shards: webdataset tar files of columnar sample blocks, their records and the manifest.

Format 2 (`recdistill-teacher-shards/2`). One tar entry = one *block* of up to `block_size`
samples, `KEY.cols` (a safetensors blob) or `KEY.cols.zst` (the same, zstd-compressed), KEY the
block's first sample key. A block stores every field as one array with the samples' rows
concatenated (nothing padded), plus the row count of each sample per row group:

    counts_items    [n]  input items per sample          -> item_ids [sum, ]
    counts_targets  [n]  positions with a target         -> targets, topk_ids [sum, K],
                                                            topk_scores [sum, K], logsumexp [sum, T],
                                                            target_logprob [sum, ]
    counts_hidden   [n]  stored hidden-state positions   -> hidden_positions, hidden_L [sum, H],
                                                            hidden_L_scale (int8)
    counts_samples  [n]  1 each                          -> user_row [n]

Decoding a block is one safetensors read (zero-copy views of the blob), and a batch is one
vectorised gather from the decoded columns (`trainer/data/shard_stream.py`). The safetensors
metadata holds one entry, `block`: a JSON text with the samples' keys and an xxh3-64 checksum of
the tensor bytes, so a flipped byte is caught by the reader, not only by the checker's sha256
(xxh3 runs at memory speed, CRC32 at a third of the loader's budget; one entry only: safetensors
keeps metadata in a hash map with a random order, and two entries would make the bytes, and so
the shard sha256s, differ from run to run).

Shards are planned by example index, independent of the number of ranks: shard group g holds
examples [g * S, (g + 1) * S) and is written by rank g % world. A group is written to `*.tmp`
files that are renamed when complete; then a small record (`group-GGGGGG.json`: files, sample
and block counts, bytes, sha256) is written atomically. A group with a valid record is done;
anything else of that group is debris from a kill and is deleted before the group is redone.
Blocks are cut at fixed sample counts inside a group, so a rerun writes byte-identical files.

Format 1 (one safetensors blob per sample, written by earlier versions) is not read: `trainer/convert_shards.py`
converts such a folder (`trainer/data/legacy_shards.py` reads it).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import xxhash
from safetensors.numpy import save as st_save

from recdistill.trainer.errors import JobError

FORMAT = "recdistill-teacher-shards/2"
MANIFEST = "manifest.json"
ITEM_TABLE_FILE = "teacher_item_embeddings.safetensors"
BLOCK_EXT = "cols"
ZSTD_EXT = "cols.zst"
COMPRESSIONS = ("none", "zstd")
ROW_GROUPS = ("items", "targets", "hidden", "samples")


class ShardError(JobError):
    """A shard that is missing, truncated, corrupt or inconsistent with the manifest."""


def row_group(field: str) -> str:
    """Which per-sample row count a field's rows follow."""
    if field == "item_ids":
        return "items"
    if field == "user_row":
        return "samples"
    if field.startswith("hidden_"):
        return "hidden"
    return "targets"


def id_dtype(num_items: int) -> np.dtype:
    """The narrowest integer that holds every item id (0 = padding .. num_items)."""
    return np.dtype(np.uint16) if num_items <= np.iinfo(np.uint16).max else np.dtype(np.int32)


# ---- blocks ----------------------------------------------------------------------------------


SAFETENSORS_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "F16": np.dtype(np.float16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),
}


def _tensor_bytes_digest(blob: bytes | memoryview, data_start: int) -> str:
    return xxhash.xxh3_64_hexdigest(memoryview(blob)[data_start:])


def _views(blob: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, arrays) of a safetensors blob, the arrays zero-copy views of it.

    safetensors.numpy.load copies every tensor out of the blob; the loader reads each block once
    and gathers from it, so it reads the (documented, fixed) layout in place instead: 8 bytes of
    header length, a JSON header of dtype / shape / byte offsets, then the tensor bytes.
    """
    header_len = int.from_bytes(blob[:8], "little")
    header = orjson.loads(blob[8 : 8 + header_len])
    meta = header.pop("__metadata__", {})
    start = 8 + header_len
    arrays = {}
    for name, info in header.items():
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
        begin, end = info["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:  # a garbled header
            raise ValueError(f"{name}: shape {shape} does not fill bytes {begin}..{end}")
        arrays[name] = np.ndarray(shape, dtype, blob, start + begin)
    return meta, arrays


def pack_block(samples: list[tuple[str, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Concatenate the samples' arrays field by field and record each sample's row counts."""
    fields = list(samples[0][1])
    arrays = {name: np.concatenate([arrays[name] for _, arrays in samples]) for name in fields}
    for group in ROW_GROUPS:
        members = [name for name in fields if row_group(name) == group]
        if members:
            arrays[f"counts_{group}"] = np.asarray(
                [len(arrays_[members[0]]) for _, arrays_ in samples], dtype=np.int32
            )
    return arrays


def encode_block(samples: list[tuple[str, dict[str, np.ndarray]]], compression: str) -> bytes:
    arrays = pack_block(samples)
    # The checksum covers the tensor bytes, which do not depend on the metadata: write once to
    # find them, then again with the checksum (safetensors lays tensors out in a fixed order).
    draft = st_save(arrays, metadata={"block": "{}"})
    data_start = 8 + int.from_bytes(draft[:8], "little")
    digest = _tensor_bytes_digest(draft, data_start)
    # the checksum first: the reader takes it from there without parsing the keys (block_checksum)
    meta = json.dumps({"xxh3": digest, "keys": [key for key, _ in samples]})
    blob = st_save(arrays, metadata={"block": meta})
    if compression == "zstd":
        import zstandard

        blob = zstandard.ZstdCompressor(level=3).compress(blob)
    return blob


@dataclass
class Block:
    arrays: dict[str, np.ndarray]
    meta: str  # the block's metadata: {"xxh3": ..., "keys": [...]} as JSON
    where: str = "block"

    @property
    def keys(self) -> list[str]:
        """The samples' keys, parsed on use: the loader never needs them, and parsing the key
        list of a 1000-sample block costs about as much as checking the block's checksum."""
        try:
            return orjson.loads(self.meta)["keys"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as error:
            raise ShardError(
                f"{self.where}: block keys cannot be decoded ({type(error).__name__}: {error})"
            ) from None


# The writer's metadata starts with the checksum (json.dumps of {"xxh3": ..., "keys": ...}): it is
# read from that fixed place, anything else is parsed whole.
_CHECKSUM_PREFIX = '{"xxh3": "'


def block_checksum(meta: str) -> str | None:
    """The xxh3 recorded in a block's metadata, without parsing its key list."""
    at = len(_CHECKSUM_PREFIX)
    if meta.startswith(_CHECKSUM_PREFIX) and meta[at + 16 : at + 18] == '",':
        return meta[at : at + 16]
    parsed = orjson.loads(meta)
    return parsed.get("xxh3") if isinstance(parsed, dict) else None


def decode_block(blob: bytes, where: str, compressed: bool) -> Block:
    """The arrays of one block (its keys parsed on use); raises ShardError naming `where` when it
    is corrupt."""
    try:
        if compressed:
            import zstandard

            # writable memory, as the plain blocks are, so tensors can view the columns
            blob = memoryview(bytearray(zstandard.ZstdDecompressor().decompress(blob)))
        metadata, arrays = _views(blob)
        meta = metadata["block"]
        checksum = block_checksum(meta)
        data_start = 8 + int.from_bytes(blob[:8], "little")
    except Exception as error:  # zstd, json and a garbled header raise several types
        raise ShardError(
            f"{where}: block cannot be decoded ({type(error).__name__}: {error})"
        ) from None
    if checksum != _tensor_bytes_digest(blob, data_start):
        raise ShardError(f"{where}: block checksum mismatch (corrupt data)")
    return Block(arrays, meta, where)


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
    if record.get("format") != FORMAT:
        return None  # written by another format version: redo it
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

    `start_group(g)`, `put(key, arrays)` and `end_group()` are queued in order; samples are cut
    into blocks of `block_size` (the group's last block may be shorter), a group's tar files are
    renamed from `.tmp` and recorded when its end is processed. `max_blocks` / `max_bytes` roll a
    group over into several tar files. Errors of the thread surface on the next call of the
    main thread.
    """

    def __init__(
        self,
        out_dir: Path,
        max_blocks: int,
        max_bytes: int,
        block_size: int = 1024,
        compression: str = "none",
        queue_size: int = 64,
        samples: dict | None = None,
    ):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")
        self.out_dir, self.max_blocks, self.max_bytes = out_dir, max_blocks, max_bytes
        self.block_size, self.compression = block_size, compression
        self.samples = samples  # what made the samples (precompute's samples_record), per record
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
        pending: list[tuple[str, dict]] = []
        counts = {"samples": 0, "blocks": 0}
        ext = ZSTD_EXT if self.compression == "zstd" else BLOCK_EXT

        def finished(tmp_name: str) -> None:  # ShardWriter's post hook: one tar file is complete
            tmp = Path(tmp_name)
            final = tmp.with_name(tmp.name.removesuffix(".tmp"))
            os.replace(tmp, final)
            size = final.stat().st_size
            files.append(
                {
                    "file": final.name,
                    "count": counts["samples"],
                    "blocks": counts["blocks"],
                    "bytes": size,
                    "sha256": sha256_file(final),
                }
            )
            self.bytes_written += size
            counts["samples"] = counts["blocks"] = 0

        def flush() -> None:
            if not pending:
                return
            # ShardWriter rolls over before writing an entry, so count after the write.
            writer.write({"__key__": pending[0][0], ext: encode_block(pending, self.compression)})
            counts["samples"] += len(pending)
            counts["blocks"] += 1
            self.samples_written += len(pending)
            pending.clear()

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
                        maxcount=self.max_blocks,
                        maxsize=self.max_bytes,
                        post=finished,
                        verbose=0,
                        mtime=0,
                    )
                elif kind == "sample":
                    pending.append(payload)
                    if len(pending) == self.block_size:
                        flush()
                elif kind == "end":
                    flush()
                    writer.close()
                    record = {"group": group, "format": FORMAT, "shards": files}
                    if self.samples is not None:
                        record["samples"] = self.samples
                    write_json_atomic(group_record_path(self.out_dir, group), record)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            self.error = error


# ---- reading and checking --------------------------------------------------------------------


def load_manifest(shard_dir: Path) -> dict:
    """The manifest of a format-2 folder; a clear ShardError for anything else."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no manifest (was trainer/precompute.py run to the end?)")
    manifest = json.loads(path.read_text())
    found = manifest.get("format")
    if found == "recdistill-teacher-shards/1":
        raise ShardError(
            f"{path}: shard format 1 (one blob per sample) is no longer read; convert the folder "
            f"with `python trainer/convert_shards.py {shard_dir} NEW_DIR` (no teacher needed)"
        )
    if found != FORMAT:
        raise ShardError(f"{path}: shard format {found!r}, this version reads {FORMAT!r}")
    return manifest


# header types that change the next entry's name or size: left to tarfile.open
EXTENDED_TAR_HEADERS = (b"x", b"g", b"X", b"L", b"K")


class ReadBuffers:
    """Memory that shard files are read into, reused once nothing views it any more.

    Reading into fresh memory runs at the page-fault rate (each new 4 kB page is mapped on first
    write: 2-3 GB/s here), reading into memory already mapped at the copy rate (7-13 GB/s). A
    buffer is free again when only this pool refers to it: every array and tensor made from a
    shard holds a reference to the buffer below it, so its reference count says it is in use."""

    def __init__(self, keep: int = 8):
        self.keep = keep  # buffers kept; more shards alive at once get fresh memory
        self.pool: list[np.ndarray] = []

    def get(self, size: int) -> np.ndarray:
        for buffer in self.pool:
            # 3 = the pool's list, the loop variable and getrefcount's argument
            if len(buffer) >= size and sys.getrefcount(buffer) == 3:
                return buffer
        buffer = np.empty(-(-size // 2**20) * 2**20, dtype=np.uint8)  # whole MiB: reusable
        if len(self.pool) < self.keep:
            self.pool.append(buffer)
        return buffer


def file_bytes(
    path: Path, buffers: ReadBuffers | None = None, map_file: bool = False
) -> memoryview:
    """A shard file's bytes as writable memory (numpy's, not bytes: tensors can view the columns
    it holds), or ShardError naming it.

    map_file: the file mapped (mmap, private: writing into it copies the page, never changes the
    file): the page cache's own pages, no copy. The loader then reads each byte once, in its
    checksum pass, where a read() copies them all first (a 10 MB shard: the device-gather loader
    0.80 against 0.50-0.53 of the page-cache read rate, docs/benchmarks.md). A file that cannot
    be mapped (empty, or on a file system without mmap) is read instead. Otherwise the file is
    read whole with one readinto() into `buffers` (fresh memory without)."""
    try:
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            if map_file and size:
                try:
                    mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError):
                    pass
                else:
                    return memoryview(np.frombuffer(mapping, dtype=np.uint8))
            buffer = buffers.get(size) if buffers else np.empty(size, dtype=np.uint8)
            data = memoryview(buffer)[:size]
            return data[: handle.readinto(data)]  # the view holds the buffer
    except OSError as error:
        raise ShardError(f"{path}: unreadable tar ({type(error).__name__}: {error})") from None


def iter_tar_blocks(path: Path, buffers: ReadBuffers | None = None, map_file: bool = False):
    """(entry name, blob, compressed) of each block of one tar file; ShardError naming the file
    on damage. The file is read whole (`file_bytes`) and each block is a zero-copy view of it.
    Headers are parsed one by one: plain ustar headers (what our writer makes) by
    `parse_ustar_header`, anything else by tarfile's own parser (`TarInfo.frombuf`, 8x slower:
    half the read time of a 1 MB shard; `tarfile.open` costs as much as the read). Archives with
    extended headers (pax or GNU long names, which our writer never makes) go through
    `tarfile.open`."""
    import tarfile

    data = file_bytes(path, buffers, map_file)
    offset = 0
    try:
        while offset + tarfile.BLOCKSIZE <= len(data):
            header = bytes(data[offset : offset + tarfile.BLOCKSIZE])
            if header.count(0) == tarfile.BLOCKSIZE:  # the zero block that ends the archive
                return
            entry = parse_ustar_header(header)
            if entry is None:
                member = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
                if member.type in EXTENDED_TAR_HEADERS:
                    yield from _iter_tar_blocks_slow(path, data, offset)
                    return
                entry = member.name, member.size, member.isfile()
            name, entry_size, is_file = entry
            start = offset + tarfile.BLOCKSIZE
            offset = start + -(-entry_size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if is_file:
                yield _block_entry(path, name, data[start : start + entry_size], entry_size)
    except tarfile.HeaderError as error:
        raise ShardError(f"{path}: unreadable tar ({type(error).__name__}: {error})") from None
    if offset < len(data):  # the archive's end-of-file blocks are missing
        raise ShardError(f"{path}: the tar is cut short (truncated?)")


def parse_ustar_header(header: bytes) -> tuple[str, int, bool] | None:
    """(name, size, is a regular file) of a plain ustar header with a valid checksum: a regular
    file or a directory, an octal size, no name prefix. None for anything else, the end-of-archive
    zero block included: tarfile's parser then decides (and names what is wrong)."""
    kind = header[156:157]
    if kind not in (b"0", b"\0", b"5") or header[345] or header[124] & 0x80:
        return None
    try:
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        checksum = int(header[148:156].rstrip(b"\0 "), 8)
    except ValueError:
        return None
    # the checksum is the byte sum with its own 8 bytes counted as spaces (tarfile's rule)
    if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
        return None
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return name, size, kind != b"5"


def _block_entry(path: Path, name: str, blob: memoryview, size: int):
    _, _, ext = name.partition(".")
    if ext not in (BLOCK_EXT, ZSTD_EXT):
        raise ShardError(f"{path}: unexpected entry {name!r}")
    if len(blob) != size:
        raise ShardError(f"{path}: entry {name!r} is cut short (truncated?)")
    return name, blob, ext == ZSTD_EXT


def _iter_tar_blocks_slow(path: Path, data: memoryview, start: int):
    """The entries from byte `start` on, headers parsed by tarfile.open."""
    import io
    import tarfile

    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                if member.isfile() and member.offset >= start:
                    blob = data[member.offset_data : member.offset_data + member.size]
                    yield _block_entry(path, member.name, blob, member.size)
    except (tarfile.TarError, EOFError) as error:
        raise ShardError(f"{path}: unreadable tar ({type(error).__name__}: {error})") from None


def read_blocks(
    path: Path, buffers: ReadBuffers | None = None, map_file: bool = False
) -> list[Block]:
    return [
        decode_block(blob, f"{path}:{name}", compressed)
        for name, blob, compressed in iter_tar_blocks(path, buffers, map_file)
    ]


def split_block(block: Block) -> list[tuple[str, dict[str, np.ndarray]]]:
    """A block's samples one by one (key, arrays as written): for inspection and tests; the
    loader never splits blocks."""
    fields = [name for name in block.arrays if not name.startswith("counts_")]
    bounds = {
        group: np.concatenate([[0], np.cumsum(block.arrays[f"counts_{group}"])])
        for group in ROW_GROUPS
        if f"counts_{group}" in block.arrays
    }
    samples = []
    for i, key in enumerate(block.keys):
        arrays = {}
        for name in fields:
            edges = bounds[row_group(name)]
            arrays[name] = block.arrays[name][edges[i] : edges[i + 1]]
        samples.append((key, arrays))
    return samples


def iter_samples(path: Path):
    """(key, arrays) of every sample of one tar file, checked."""
    for block in read_blocks(path):
        yield from split_block(block)


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
    try:
        count = sum(len(block.keys) for block in read_blocks(path))
    except ShardError as error:
        problems.append(str(error))
    else:
        if count != record["count"]:
            problems.append(f"{path}: {count} samples, manifest says {record['count']}")
    return problems
