"""Write one shard of one table as one Parquet file, atomically, plus the per-shard done markers.

Layout under an output root:
    <root>/<table>/run_id=<run_id>/<shard>.parquet   one file per (table, run, shard)
    <root>/_done/run_id=<run_id>/<shard>             written last, once every table of the shard is on disk

A shard is rewritten whole (same path, os.replace), so resuming a run never duplicates rows, and a crash
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from eive_audit.storage.schema import ALLOWED_VALUES, SCHEMAS

DONE_DIR = "_done"

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_name(kind: str, value: str) -> str:
    """Refuse run ids and shard names that could escape the root or hide as dot-files; return the name."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value.startswith(".") or ".." in value:
        raise ValueError(
            f"bad {kind} {value!r}: use letters, digits, '_', '-' and '.', not starting with '.' and without '..'"
        )
    return value


def _partition_dir(root: Path, table: str, run_id: str) -> Path:
    """The hive partition directory of one run in one table."""
    return Path(root) / table / f"run_id={_check_name('run_id', run_id)}"


def write_table(root: Path, table: str, run_id: str, shard: str, rows: list[dict[str, Any]] | pa.Table) -> Path:
    """Cast `rows` to the table's schema and write them as `<root>/<table>/run_id=<run_id>/<shard>.parquet`.

    Missing nullable columns become null; unknown columns, missing required values, values of the wrong
    type or outside ALLOWED_VALUES raise ValueError naming the column, before anything touches the disk.
    Returns the file's path.
    """
    if table not in SCHEMAS:
        raise ValueError(f"unknown table {table!r}; tables are {sorted(SCHEMAS)}")
    _check_name("shard", shard)
    data = _to_schema(table, rows)
    path = table_path(root, table, run_id, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_atomically(path, lambda handle: pq.write_table(data, handle))
    return path


def to_table(table: str, rows: list[dict[str, Any]] | pa.Table) -> pa.Table:
    """`rows` as an Arrow table of the table's schema, checked as `write_table` checks them (ValueError naming
    the column); for a writer that prepares rows before it writes them."""
    if table not in SCHEMAS:
        raise ValueError(f"unknown table {table!r}; tables are {sorted(SCHEMAS)}")
    return _to_schema(table, rows)


def table_path(root: Path, table: str, run_id: str, shard: str) -> Path:
    """Where one shard of one table lives: `<root>/<table>/run_id=<run_id>/<shard>.parquet`."""
    return _partition_dir(root, table, run_id) / f"{_check_name('shard', shard)}.parquet"


def read_table(root: Path, table: str, run_id: str, shard: str) -> pa.Table:
    """One shard of one table as written (no run_id column), e.g. to rewrite it with more columns filled."""
    if table not in SCHEMAS:
        raise ValueError(f"unknown table {table!r}; tables are {sorted(SCHEMAS)}")
    return pq.read_table(table_path(root, table, run_id, shard), schema=SCHEMAS[table], partitioning=None)


def _to_schema(table: str, rows: list[dict[str, Any]] | pa.Table) -> pa.Table:
    """`rows` (dicts or an Arrow table) as an Arrow table of exactly SCHEMAS[table], checked column by column."""
    schema = SCHEMAS[table]
    columns = _columns(rows)
    unknown = sorted(set(columns) - set(schema.names))
    if unknown:
        raise ValueError(f"table {table!r} has no column(s) {unknown}; its columns are {schema.names}")
    n_rows = len(rows) if isinstance(rows, list) else rows.num_rows
    arrays = [_cast_column(table, field, columns.get(field.name), n_rows) for field in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _columns(rows: list[dict[str, Any]] | pa.Table) -> dict[str, pa.Array | pa.ChunkedArray]:
    """Column name -> values, with types inferred from the Python values when rows are dicts."""
    if isinstance(rows, pa.Table):
        if len(set(rows.column_names)) != len(rows.column_names):
            raise ValueError(f"duplicate column names in {rows.column_names}")
        return {name: rows.column(name) for name in rows.column_names}
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise TypeError(f"rows must be a list of dicts or a pyarrow.Table, got {type(rows).__name__}")
    names = {name for row in rows for name in row}
    columns: dict[str, pa.Array | pa.ChunkedArray] = {}
    for name in sorted(names):
        try:
            columns[name] = pa.array([row.get(name) for row in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"column {name!r}: values of mixed or unsupported types ({exc})") from exc
    return columns


def _kind(type_: pa.DataType) -> str:
    """Coarse type family; casts are allowed only inside one, so '12' never silently becomes 12."""
    if pa.types.is_integer(type_) or pa.types.is_floating(type_):
        return "number"
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return "string"
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_):
        return "binary"
    if pa.types.is_timestamp(type_):
        return "timestamp"
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return f"list<{_kind(type_.value_type)}>"
    return str(type_)


def _cast_column(table: str, field: pa.Field, values: pa.Array | pa.ChunkedArray | None,
                 n_rows: int) -> pa.ChunkedArray:
    """One column cast safely (no truncation or overflow) to its field's type, then checked for nulls and values."""
    if values is None:
        values = pa.nulls(n_rows)
    if not pa.types.is_null(values.type):
        if _kind(values.type) != _kind(field.type):
            raise ValueError(f"column {field.name!r}: expected {field.type}, got {values.type}")
        if pa.types.is_timestamp(values.type) and values.type.tz is None and field.type.tz is not None:
            raise ValueError(f"column {field.name!r}: naive datetimes are ambiguous; give them a timezone")
    try:
        cast = values.cast(field.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"column {field.name!r}: cannot store as {field.type} ({exc})") from exc
    if not field.nullable and cast.null_count:
        raise ValueError(f"column {field.name!r} is required but has {cast.null_count} missing value(s)")
    allowed = ALLOWED_VALUES.get((table, field.name))
    if allowed is not None:
        bad = sorted({value for value in cast.to_pylist() if value is not None} - allowed)
        if bad:
            raise ValueError(f"column {field.name!r}: values {bad} not in {sorted(allowed)}")
    return pa.chunked_array([cast]) if isinstance(cast, pa.Array) else cast


def shard_done(root: Path, run_id: str, shard: str) -> bool:
    """Whether every table of this shard was written (its marker exists), so a resumed run may skip it."""
    return _marker(root, run_id, shard).is_file()


def mark_shard_done(root: Path, run_id: str, shard: str) -> Path:
    """Write the shard's done marker; call it only after all of the shard's tables are written."""
    path = _marker(root, run_id, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).isoformat().encode()
    _replace_atomically(path, lambda handle: handle.write(stamp))
    return path


def remove_run(root: Path, run_id: str) -> None:
    """Delete a run's markers, then its partitions in every table; missing parts are fine.

    Markers go first so that a crash half-way never leaves a marker claiming a shard whose data is gone.
    """
    for directory in [_done_dir(root, run_id), *(_partition_dir(root, table, run_id) for table in SCHEMAS)]:
        if directory.exists():
            shutil.rmtree(directory)


def _done_dir(root: Path, run_id: str) -> Path:
    return Path(root) / DONE_DIR / f"run_id={_check_name('run_id', run_id)}"


def _marker(root: Path, run_id: str, shard: str) -> Path:
    return _done_dir(root, run_id) / _check_name("shard", shard)


def _replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(handle)` on a temp file beside `path`, fsync it, then os.replace it over `path`.

    The temp name starts with '.' and ends with '.tmp', so the catalog's `*.parquet` glob never sees it. It is
    created with mode 0666 less the umask, as any file the user writes (mkstemp would make it 0600).
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
