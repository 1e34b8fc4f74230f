"""Storage: Parquet schemas and shard writers, map encoding, the DuckDB catalog, runs and their summaries,
a shard's write-back, schema versions.

Imports none of the other project packages.
"""

from eive_audit.storage.catalog import CATALOG_NAME, ReadOnlyQueryError, load_map, query, refresh_catalog
from eive_audit.storage.maps import decode_map, encode_map
from eive_audit.storage.runs import RunInfo, fail_run, finish_run, report_path, run_summary, start_run
from eive_audit.storage.schema import SCHEMA_VERSION, SCHEMAS
from eive_audit.storage.versions import SchemaVersionError, check_schema_versions
from eive_audit.storage.writer import mark_shard_done, read_table, remove_run, shard_done, write_table

__all__ = [
    "CATALOG_NAME",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "ReadOnlyQueryError",
    "RunInfo",
    "SchemaVersionError",
    "check_schema_versions",
    "decode_map",
    "encode_map",
    "fail_run",
    "finish_run",
    "load_map",
    "mark_shard_done",
    "query",
    "read_table",
    "refresh_catalog",
    "remove_run",
    "report_path",
    "run_summary",
    "shard_done",
    "start_run",
    "write_table",
]
