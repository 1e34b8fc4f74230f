"""The DuckDB catalog: a view per table over the store's finished shards, on disk and for every query.

A shard's files count once its done-marker exists (`storage.writer`): the tables of a shard are written
first and its marker last, so a reader never sees half a shard, and `eive-audit sql` works while a run is
still writing, on the shards already done. The one-file-per-run tables (`runs`, `findings`) are replaced
whole and count as soon as they exist.

Nothing in the store names an absolute path, so a store can be moved or copied. `catalog.duckdb` at the
root holds the views with paths relative to the store, for `cd STORE && duckdb catalog.duckdb`; it is
rebuilt after every shard. `query`, the project's own reader, does not trust paths at all: it builds the
same views in memory over the files found under the root it is given, so it reads a moved store, and never
another store that happens to lie under the current directory.
"""

from __future__ import annotations

import fcntl
import os
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from eive_audit.storage.maps import decode_map
from eive_audit.storage.schema import RUN_TABLES, SCHEMAS
from eive_audit.storage.versions import check_schema_versions
from eive_audit.storage.writer import DONE_DIR

CATALOG_NAME = "catalog.duckdb"
_refreshing = threading.Lock()


class ReadOnlyQueryError(ValueError):
    """A statement passed to `query` tried to change the catalog or write files."""


def catalog_path(root: Path) -> Path:
    return Path(root) / CATALOG_NAME


def refresh_catalog(root: Path, check_versions: bool = True) -> Path:
    """(Re)create the on-disk catalog's views over the shards finished now; returns the catalog's path.

    Built in a temp file beside the catalog and moved over it with os.replace, so a reader sees the old
    catalog or the new one, never a half-written one. Refreshes are serialised (threads of this process and
    other processes writing the same store), so the last one lists every shard marked before it. A store
    holding files of another schema version raises SchemaVersionError instead (the views would mix layouts);
    a run that checked the store when it started and writes only its own files passes `check_versions=False`,
    since the check reads the footer of every file in the store.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if check_versions:
        check_schema_versions(root)
    final = catalog_path(root)
    with _store_lock(root):
        tmp = root / f".{CATALOG_NAME}.{uuid.uuid4().hex}.tmp"
        try:
            with duckdb.connect(str(tmp)) as con:
                con.execute(f"SET file_search_path = {_sql_string(str(root))}")  # to bind the relative paths
                _create_views(con, root, relative=True)
            os.replace(tmp, final)
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                leftover.unlink(missing_ok=True)
    return final


@contextmanager
def _store_lock(root: Path) -> Iterator[None]:
    """Hold the store's catalog lock: a thread lock for this process, an flock on the store's folder itself
    for the others (no lock file to leave behind)."""
    with _refreshing:
        fd = os.open(root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


def finished_files(root: Path, table: str) -> list[Path]:
    """The table's files that belong in its view, relative to `root`, sorted: every file of a run-wide table,
    and of a shard table the files whose shard has its done-marker."""
    root = Path(root)
    files = sorted(path.relative_to(root) for path in (root / table).glob("run_id=*/*.parquet"))
    if table in RUN_TABLES:
        return files
    return [path for path in files if (root / DONE_DIR / path.parent.name / path.stem).is_file()]


def _create_views(con: duckdb.DuckDBPyConnection, root: Path, relative: bool,
                  tables: Collection[str] = tuple(SCHEMAS)) -> None:
    """A view per table over its finished files: paths relative to the store, or absolute under `root`."""
    for table in tables:
        files = [str(path if relative else root / path) for path in finished_files(root, table)]
        con.execute(f"CREATE OR REPLACE VIEW {table} AS {_view_sql(con, table, files)}")


def _view_sql(con: duckdb.DuckDBPyConnection, table: str, files: list[str]) -> str:
    """The SELECT behind a table's view: its files when there are some, else zero rows of the right columns."""
    if files:
        listed = ", ".join(_sql_string(path) for path in files)
        return (
            f"SELECT * FROM read_parquet([{listed}], hive_partitioning=true, "
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

    Protection, in layers: DuckDB's parser must classify the statement as a SELECT (so no DDL, no COPY ...
    TO, no EXPLAIN ANALYZE, no ATTACH); the views live in a fresh in-memory database, so nothing persists; file
    access is limited to the tables' folders and the configuration is locked. A refused statement raises
    ReadOnlyQueryError. `params` fill `?` placeholders.
    """
    with reader(root, _tables_of(_one_select(sql))) as read:
        return read(sql, params)


@contextmanager
def reader(root: Path, tables: Collection[str] = tuple(SCHEMAS)) -> Iterator[Callable[..., pa.Table]]:
    """`read(sql, params)`, as `query` but for several SELECTs over one connection (one set of views over the
    files as they are when the block starts): a connection costs tens of milliseconds, a count next to nothing."""
    with _connect_read_only(root, tables) as con:
        yield lambda sql, params=None: con.sql(_one_select(sql), params=params).to_arrow_table()


def _one_select(sql: str) -> str:
    statements = duckdb.extract_statements(sql)
    refused = [statement.type.name for statement in statements if statement.type != duckdb.StatementType.SELECT]
    if refused:
        raise ReadOnlyQueryError(f"the catalog is opened read-only; only SELECT queries are allowed, got {refused}")
    if len(statements) != 1:
        raise ValueError(f"query takes exactly one SQL statement, got {len(statements)}")
    return sql


_PARSER = duckdb.connect(":memory:")  # parses statements only; each thread takes a cursor of its own


def _tables_of(sql: str) -> Collection[str]:
    """The store's tables a statement names, so a query binds only their views (binding a view reads the
    footer of every file it lists); all tables when DuckDB cannot tell without binding (a JOIN ... USING)."""
    with _PARSER.cursor() as con:
        try:
            return set(SCHEMAS) & con.get_table_names(sql)
        except duckdb.Error:
            return tuple(SCHEMAS)


def _connect_read_only(root: Path, tables: Collection[str] = tuple(SCHEMAS)) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the store's views over the files under `root` as it is now, that can read
    the tables' files and no other file. The catalog file must exist: it is what marks a folder as a store."""
    root = Path(root).resolve()
    path = catalog_path(root)
    if not path.is_file():
        raise FileNotFoundError(f"no catalog at {path}; write some shards and call "
                                f"refresh_catalog({str(root)!r}) first")
    con = duckdb.connect(":memory:")
    _create_views(con, root, relative=False, tables=tables)
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
