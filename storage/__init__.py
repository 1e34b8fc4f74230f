"""Storage: Parquet schemas and shard writers, map encoding, the DuckDB catalog, run manifests.

Imports none of the other project packages.
"""

from eive_audit.storage.catalog import CATALOG_NAME, ReadOnlyQueryError, load_map, query, refresh_catalog
from eive_audit.storage.maps import decode_map, encode_map
from eive_audit.storage.schema import SCHEMA_VERSION, SCHEMAS
from eive_audit.storage.writer import mark_shard_done, read_table, remove_run, shard_done, write_table

__all__ = [
    "CATALOG_NAME",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "ReadOnlyQueryError",
    "decode_map",
    "encode_map",
    "load_map",
    "mark_shard_done",
    "query",
    "read_table",
    "refresh_catalog",
    "remove_run",
    "shard_done",
    "write_table",
]
