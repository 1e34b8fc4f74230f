"""Schema versions in a store: every Parquet file carries the SCHEMA_VERSION it was written with (in its
metadata), and a store whose files disagree with this version is refused, not read.

The catalog's views read all runs with `union_by_name`, which fills a column an old file lacks with nulls
and so would hide a mix of layouts; the run hash takes the schema version, so an old run is never resumed,
but its files would still sit under the same views.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from eive_audit.storage.schema import SCHEMA_VERSION, SCHEMA_VERSION_KEY, SCHEMAS


class SchemaVersionError(RuntimeError):
    """A store holds runs written with another schema version than the one this code writes."""


def stale_runs(root: Path) -> dict[str, set[str]]:
    """Schema version (as stored; "none" for a file without one) -> ids of the runs with files in it, for
    every version other than SCHEMA_VERSION. Reads only the files' footers."""
    stale: dict[str, set[str]] = {}
    for table in SCHEMAS:
        for path in (Path(root) / table).glob("run_id=*/*.parquet"):
            stored = (pq.read_schema(path).metadata or {}).get(SCHEMA_VERSION_KEY, b"none").decode()
            if stored != str(SCHEMA_VERSION):
                stale.setdefault(stored, set()).add(path.parent.name.removeprefix("run_id="))
    return stale


def check_schema_versions(root: Path) -> None:
    """Raise SchemaVersionError naming the runs of `root` written with another schema version, and the way out."""
    stale = stale_runs(root)
    if not stale:
        return
    held = "; ".join(f"run(s) {', '.join(sorted(runs))} written with schema version {version}"
                     for version, runs in sorted(stale.items()))
    raise SchemaVersionError(
        f"store {root} holds {held}; this version writes {SCHEMA_VERSION}: rerun into a new store or remove those "
        f"runs with `python -c \"from eive_audit.storage import remove_run; remove_run('{root}', '<run_id>')\"`")
