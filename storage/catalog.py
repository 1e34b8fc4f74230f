"""The DuckDB catalog: one file at the output root holding a view per table over its Parquet shards.

The catalog stores views only, never data, so it is cheap to rebuild after every shard and safe to
replace while readers hold the old one open. Readers go through `query`, which cannot write.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from eive_audit.storage.maps import decode_map
from eive_audit.storage.schema import SCHEMAS
from eive_audit.storage.versions import check_schema_versions

CATALOG_NAME = "catalog.duckdb"


class ReadOnlyQueryError(ValueError):
    """A statement passed to `query` tried to change the catalog or write files."""


def catalog_path(root: Path) -> Path:
    return Path(root) / CATALOG_NAME


def refresh_catalog(root: Path) -> Path:
    """(Re)create the catalog's views over whatever shards exist now; returns the catalog's path.

    Built in a temp file beside the catalog and moved over it with os.replace, so a reader sees the old
    catalog or the new one, never a half-written one. A store holding files of another schema version raises
    SchemaVersionError instead (the views would mix the layouts).
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    check_schema_versions(root)
    final = catalog_path(root)
    tmp = root / f".{CATALOG_NAME}.{uuid.uuid4().hex}.tmp"
    try:
        with duckdb.connect(str(tmp)) as con:
            for table in SCHEMAS:
                con.execute(f"CREATE OR REPLACE VIEW {table} AS {_view_sql(con, root, table)}")
        os.replace(tmp, final)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)
    return final


def _view_sql(con: duckdb.DuckDBPyConnection, root: Path, table: str) -> str:
    """The SELECT behind a table's view: its shards when there are some, else zero rows of the right columns."""
    if any((root / table).glob("run_id=*/*.parquet")):
        files = _sql_string(f"{root / table}/*/*.parquet")
        return (
            f"SELECT * FROM read_parquet({files}, hive_partitioning=true, "
            "hive_types={'run_id': VARCHAR}, union_by_name=true)"
        )
    columns = [f'CAST(NULL AS {type_}) AS "{name}"' for name, type_ in _duckdb_columns(con, SCHEMAS[table])]
    return f"SELECT {', '.join(columns)}, CAST(NULL AS VARCHAR) AS run_id WHERE false"


def _duckdb_columns(con: duckdb.DuckDBPyConnection, schema: pa.Schema) -> list[tuple[str, str]]:
    """(name, DuckDB type) per column, as DuckDB itself maps the Arrow types, so no hand-kept type table."""
    con.register("arrow_schema", schema.empty_table())
    try:
        return [(row[0], row[1]) for row in con.execute("DESCRIBE SELECT * FROM arrow_schema").fetchall()]
    finally:
        con.unregister("arrow_schema")


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def query(root: Path, sql: str, params: Sequence[object] | None = None) -> pa.Table:
    """Run one SELECT over the catalog at `root` and return its rows as an Arrow table.

    Protection, in layers: DuckDB's parser must classify the statement as a SELECT (read-only mode alone
    lets COPY ... TO and EXPLAIN ANALYZE write files); the database is opened read-only; file access is
    limited to the tables' folders and the configuration is locked. Any refused write raises
    ReadOnlyQueryError. `params` fill `?` placeholders.
    """
    statements = duckdb.extract_statements(sql)
    refused = [statement.type.name for statement in statements if statement.type != duckdb.StatementType.SELECT]
    if refused:
        raise ReadOnlyQueryError(f"the catalog is opened read-only; only SELECT queries are allowed, got {refused}")
    if len(statements) != 1:
        raise ValueError(f"query takes exactly one SQL statement, got {len(statements)}")
    with _connect_read_only(root) as con:
        try:
            return con.sql(sql, params=params).to_arrow_table()
        except duckdb.InvalidInputException as exc:
            if "read-only" in str(exc):
                raise ReadOnlyQueryError(f"the catalog is opened read-only; {exc}") from exc
            raise


def _connect_read_only(root: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection that can read the tables' shards and no other file."""
    root = Path(root).resolve()
    path = catalog_path(root)
    if not path.is_file():
        raise FileNotFoundError(f"no catalog at {path}; write some shards and call "
                                f"refresh_catalog({str(root)!r}) first")
    con = duckdb.connect(str(path), read_only=True)
    allowed = ", ".join(_sql_string(f"{root / table}{os.sep}") for table in SCHEMAS)
    con.execute(f"SET allowed_directories = [{allowed}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def load_map(root: Path, instance_id: str, explainer: str | None = None, run_id: str | None = None) -> np.ndarray:
    """One instance's saliency map as float32 [grid_h, grid_w]; name the explainer (or run) when several match."""
    sql = 'SELECT explainer, run_id, grid_h, grid_w, "map" FROM maps WHERE instance_id = ?'
    params: list[object] = [instance_id]
    for column, value in (("explainer", explainer), ("run_id", run_id)):
        if value is not None:
            sql += f" AND {column} = ?"
            params.append(value)
    rows = query(root, sql, params).to_pylist()
    if not rows:
        raise KeyError(f"no map for instance {instance_id!r} (explainer={explainer!r}, run_id={run_id!r})")
    if len(rows) > 1:
        found = sorted((row["explainer"], row["run_id"]) for row in rows)
        raise ValueError(f"{len(rows)} maps for instance {instance_id!r} as (explainer, run_id) {found}; "
                         "pass one of them")
    row = rows[0]
    return decode_map(row["map"], row["grid_h"], row["grid_w"])
