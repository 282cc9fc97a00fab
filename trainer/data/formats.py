"""Readers that turn interaction logs into a stream of Arrow tables.

Every reader yields `pyarrow.Table` chunks with one schema, `EVENT_SCHEMA`:
``user`` and ``item`` as strings (raw ids, whatever the source uses), ``time`` as float64 and
``order`` as the event's global position in the file, which breaks ties between equal times so
that sorting by (user, time, order) is stable with respect to the file.

Errors name the file and the line (or the column) and are raised as `DataError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recdistill.trainer.errors import JobError

EVENT_SCHEMA = pa.schema(
    [("user", pa.string()), ("item", pa.string()), ("time", pa.float64()), ("order", pa.int64())]
)
CHUNK_LINES = 1_000_000
FILE_FORMATS = ("sasrec", "lines", "recbole", "movielens", "csv", "tsv", "parquet", "jsonl")
FORMATS = (*FILE_FORMATS, "synthetic")


class DataError(JobError):
    """Bad input: the message names the file and the line or column."""


def events_table(users: list, items: list, times, first_order: int) -> pa.Table:
    n = len(users)
    return pa.table(
        {
            "user": pa.array(users, pa.string()),
            "item": pa.array(items, pa.string()),
            "time": pa.array(np.asarray(times, dtype=np.float64)),
            "order": pa.array(np.arange(first_order, first_order + n, dtype=np.int64)),
        },
        schema=EVENT_SCHEMA,
    )


def _read_sasrec(path: Path) -> Iterator[pa.Table]:
    """`user item` per line, each user's lines in time order: the file order is the time."""
    users: list[str] = []
    items: list[str] = []
    done = 0
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DataError(
                    f"{path}:{line_no}: expected 'user item' (2 fields), got {len(fields)}: {line.strip()[:80]!r}"
                )
            users.append(fields[0])
            items.append(fields[1])
            if len(users) >= CHUNK_LINES:
                yield events_table(users, items, np.arange(done, done + len(users)), done)
                done += len(users)
                users, items = [], []
    if users:
        yield events_table(users, items, np.arange(done, done + len(users)), done)


def _read_lines(path: Path) -> Iterator[pa.Table]:
    """`user i1 i2 ... in` per line, items in time order."""
    users: list[str] = []
    items: list[str] = []
    done = 0
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise DataError(
                    f"{path}:{line_no}: expected 'user item1 item2 ...', got only {fields[0]!r}"
                )
            users.extend([fields[0]] * (len(fields) - 1))
            items.extend(fields[1:])
            if len(users) >= CHUNK_LINES:
                yield events_table(users, items, np.arange(done, done + len(users)), done)
                done += len(users)
                users, items = [], []
    if users:
        yield events_table(users, items, np.arange(done, done + len(users)), done)


def _parse_time(value: str, path: Path, line_no: int, column: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataError(
            f"{path}:{line_no}: column {column!r}: time {value!r} is not a number"
        ) from None


def _read_delimited_lines(
    path: Path,
    sep: str,
    user_idx: int,
    item_idx: int,
    time_idx: int | None,
    n_fields: int,
    time_name: str,
    first_line: int,
) -> Iterator[pa.Table]:
    """Lines of `sep`-separated fields (RecBole atomic files, MovieLens `::` files)."""
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    done = 0
    with open(path, encoding="utf-8", errors="strict") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line_no < first_line:
                continue
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split(sep)
            if len(fields) != n_fields:
                raise DataError(
                    f"{path}:{line_no}: expected {n_fields} {sep!r}-separated fields, got {len(fields)}: {line[:80]!r}"
                )
            users.append(fields[user_idx].strip())
            items.append(fields[item_idx].strip())
            times.append(
                _parse_time(fields[time_idx], path, line_no, time_name)
                if time_idx is not None
                else done + len(times)
            )
            if len(users) >= CHUNK_LINES:
                yield events_table(users, items, times, done)
                done += len(users)
                users, items, times = [], [], []
    if users:
        yield events_table(users, items, times, done)


def _read_recbole(
    path: Path, user_col: str, item_col: str, time_col: str | None
) -> Iterator[pa.Table]:
    """RecBole atomic `.inter` file: tab-separated, header fields typed as `name:type`."""
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n").split("\t")
    names = [field.split(":")[0] for field in header]

    def index_of(column: str) -> int:
        if column not in names:
            raise DataError(
                f"{path}:1: column {column!r} not in the header (columns: {', '.join(names)})"
            )
        return names.index(column)

    # Without --time-col the `timestamp` field is used when the file has one, else the file order.
    if time_col is None:
        time_col = "timestamp" if "timestamp" in names else None
    time_idx = index_of(time_col) if time_col else None
    yield from _read_delimited_lines(
        path,
        "\t",
        index_of(user_col),
        index_of(item_col),
        time_idx,
        len(names),
        time_col or "",
        first_line=2,
    )


def _read_movielens(path: Path) -> Iterator[pa.Table]:
    """MovieLens `ratings.dat`: `UserID::MovieID::Rating::Timestamp`."""
    yield from _read_delimited_lines(path, "::", 0, 1, 3, 4, "timestamp", first_line=1)


def _columns_or_error(path: Path, available: list[str], wanted: list[str]) -> None:
    for column in wanted:
        if column not in available:
            raise DataError(
                f"{path}: column {column!r} not found (columns: {', '.join(available)})"
            )


def _time_array(
    values: pa.Array, path: Path, column: str, first_row: int, header_lines: int
) -> pa.Array:
    """Numeric times pass through; ISO-8601 strings become seconds since the epoch."""
    if pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        return pc.cast(values, pa.float64())
    if pa.types.is_timestamp(values.type):
        return pc.divide(pc.cast(pc.cast(values, pa.timestamp("us")), pa.int64()), 1e6)
    try:
        return pc.cast(values, pa.float64())
    except pa.ArrowInvalid:
        pass
    try:
        stamps = pc.cast(values, pa.timestamp("us"))
        return pc.divide(pc.cast(stamps, pa.int64()), 1e6)
    except pa.ArrowInvalid:
        for offset, value in enumerate(values.to_pylist()):
            try:
                float(value)
            except (TypeError, ValueError):
                line = first_row + offset + header_lines
                raise DataError(
                    f"{path}:{line}: column {column!r}: time {value!r} is neither a number nor an ISO-8601 timestamp"
                ) from None
        raise


def _chunk_from_columns(
    batch: pa.RecordBatch | pa.Table,
    path: Path,
    user_col: str,
    item_col: str,
    time_col: str | None,
    done: int,
    header_lines: int,
) -> pa.Table:
    n = batch.num_rows
    users = batch.column(user_col)
    items = batch.column(item_col)
    for column, values in ((user_col, users), (item_col, items)):
        if values.null_count:
            bad = pc.index(pc.is_null(values), True).as_py()
            raise DataError(f"{path}:{done + bad + header_lines}: column {column!r} is empty")
    if time_col:
        times = _time_array(batch.column(time_col), path, time_col, done, header_lines)
        if times.null_count:
            bad = pc.index(pc.is_null(times), True).as_py()
            raise DataError(f"{path}:{done + bad + header_lines}: column {time_col!r} is empty")
    else:
        times = pa.array(np.arange(done, done + n, dtype=np.float64))
    return pa.table(
        {
            "user": pc.cast(users, pa.string()),
            "item": pc.cast(items, pa.string()),
            "time": times,
            "order": pa.array(np.arange(done, done + n, dtype=np.int64)),
        },
        schema=EVENT_SCHEMA,
    )


def _read_csv(
    path: Path, delimiter: str, user_col: str, item_col: str, time_col: str | None
) -> Iterator[pa.Table]:
    bad_rows: list[pacsv.InvalidRow] = []

    def remember_bad_row(row: pacsv.InvalidRow) -> str:
        bad_rows.append(row)  # pyarrow swallows exceptions raised here: report after it stops
        return "error"

    def as_data_error(error: pa.ArrowInvalid, done: int) -> DataError:
        if bad_rows:
            row = bad_rows[0]
            where = f"{path}:{row.number}" if row.number is not None else str(path)
            return DataError(
                f"{where}: expected {row.expected_columns} columns, got {row.actual_columns}: {row.text[:80]!r}"
            )
        return DataError(f"{path}: after row {done}: {error}")

    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n").split(delimiter)
    header = [name.strip().strip('"') for name in header]
    wanted = [user_col, item_col] + ([time_col] if time_col else [])
    _columns_or_error(path, header, wanted)
    types = {user_col: pa.string(), item_col: pa.string()}
    done = 0
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=32 << 20, use_threads=False),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, invalid_row_handler=remember_bad_row
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=wanted, column_types=types, strings_can_be_null=True
            ),
        )
        for batch in reader:
            yield _chunk_from_columns(
                batch, path, user_col, item_col, time_col, done, header_lines=2
            )
            done += batch.num_rows
    except pa.ArrowInvalid as error:
        raise as_data_error(error, done) from None


def _read_parquet(
    path: Path, user_col: str, item_col: str, time_col: str | None
) -> Iterator[pa.Table]:
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowInvalid as error:
        raise DataError(f"{path}: not a readable Parquet file: {error}") from None
    wanted = [user_col, item_col] + ([time_col] if time_col else [])
    _columns_or_error(path, parquet.schema_arrow.names, wanted)
    done = 0
    for batch in parquet.iter_batches(batch_size=CHUNK_LINES, columns=wanted):
        # Parquet has no lines: positions are reported as row numbers (1-based).
        yield _chunk_from_columns(batch, path, user_col, item_col, time_col, done, header_lines=1)
        done += batch.num_rows


def _read_jsonl(
    path: Path, user_col: str, item_col: str, time_col: str | None
) -> Iterator[pa.Table]:
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    done = 0
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_no}: not valid JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line")
            for column in [user_col, item_col] + ([time_col] if time_col else []):
                if record.get(column) is None:
                    raise DataError(f"{path}:{line_no}: column {column!r} missing")
            users.append(str(record[user_col]))
            items.append(str(record[item_col]))
            if time_col:
                times.append(_parse_time(str(record[time_col]), path, line_no, time_col))
            else:
                times.append(done + len(times))
            if len(users) >= CHUNK_LINES:
                yield events_table(users, items, times, done)
                done += len(users)
                users, items, times = [], [], []
    if users:
        yield events_table(users, items, times, done)


def read_events(
    fmt: str,
    path: str | Path,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
) -> Iterator[pa.Table]:
    """Stream a log file as `EVENT_SCHEMA` tables of at most about a million events."""
    path = Path(path)
    if fmt not in FILE_FORMATS:
        raise DataError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if fmt == "sasrec":
        return _read_sasrec(path)
    if fmt == "lines":
        return _read_lines(path)
    if fmt == "movielens":
        return _read_movielens(path)
    if fmt == "recbole":
        return _read_recbole(path, user_col or "user_id", item_col or "item_id", time_col)
    if not user_col or not item_col:
        raise DataError(
            f"--format {fmt} needs --user-col and --item-col (and optionally --time-col)"
        )
    if fmt in ("csv", "tsv"):
        return _read_csv(path, "," if fmt == "csv" else "\t", user_col, item_col, time_col)
    if fmt == "parquet":
        return _read_parquet(path, user_col, item_col, time_col)
    return _read_jsonl(path, user_col, item_col, time_col)
