"""Storage: Parquet schemas and shard writers, map encoding, the DuckDB catalog, run manifests.

Imports none of the other project packages.
"""
