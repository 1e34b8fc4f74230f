"""A shard's tables as the audit writes and rewrites them, and the run-wide reads its later steps start from.

Exactly once: a shard's tables are written first and its done-marker last, each file atomically under a
fixed name, so a run killed at any point leaves either a finished shard or one that a rerun rewrites whole.
A step that rewrites a finished shard's instances (faithfulness, findings) has its own marker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from eive_audit.storage.catalog import query
from eive_audit.storage.maps import decode_map, encode_map
from eive_audit.storage.runs import RUN_SHARD
from eive_audit.storage.schema import FLAGGED
from eive_audit.storage.writer import mark_shard_done, read_table, to_table, write_table

SHARD_TABLES = ("images", "instances", "maps", "errors")  # the tables every shard writes, one file each

Key = tuple[str, str]  # (instance_id, explainer): one row of instances and of maps
Row = dict[str, Any]


class ShardWriter:
    """One shard's tables, written while the audit computes them. Each part (a batch's rows, maps as float
    arrays) is encoded and cast to Arrow on the writer's own thread, at most `depth` parts behind the caller,
    so the Python work of the write overlaps the next forward; `close` writes each table's file atomically,
    then the done-marker, so `query` lists the shard from then on (the flow rebuilds catalog.duckdb once
    after the map step). A shard that fails before `close` writes nothing: a rerun does it whole, and the
    shards already closed stay."""

    def __init__(self, root: Path, run_id: str, shard: str, depth: int = 2) -> None:
        self.root, self.run_id, self.shard, self.depth = root, run_id, shard, depth
        self.counts = dict.fromkeys(SHARD_TABLES, 0)
        self._parts: dict[str, list[pa.Table]] = {name: [] for name in SHARD_TABLES}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"eive-write-{shard}")
        self._pending: deque[Future[None]] = deque()

    def add(self, tables: Mapping[str, list[Row]]) -> None:
        """Queue one part's rows (a table left out has none); waits while `depth` parts are still queued."""
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._prepare, dict(tables)))
        for name in SHARD_TABLES:
            self.counts[name] += len(tables.get(name, []))

    def _prepare(self, tables: dict[str, list[Row]]) -> None:
        for name in SHARD_TABLES:
            rows = [{**row, "shard": self.shard} for row in tables.get(name, [])]
            if name == "maps":
                rows = [row | {"map": encode_map(row["map"])} for row in rows]
            self._parts[name].append(to_table(name, rows))

    def close(self) -> None:
        """Write the shard's files, then its marker; raises what preparing any part raised."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(cancel_futures=True)
        for name in SHARD_TABLES:
            parts = self._parts[name]
            write_table(self.root, name, self.run_id, self.shard, pa.concat_tables(parts) if parts else [])
        mark_shard_done(self.root, self.run_id, self.shard)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Close on success; on an exception, drop the queued parts and write nothing."""
        if kind is None:
            self.close()
        else:
            self._pool.shutdown(cancel_futures=True)


def read_shard_instances(root: Path, run_id: str, shard: str) -> tuple[list[Row], dict[Key, np.ndarray]]:
    """One shard's instance rows as written and its maps decoded, keyed by (instance_id, explainer)."""
    rows = read_table(root, "instances", run_id, shard).to_pylist()
    return rows, _decoded(read_table(root, "maps", run_id, shard).to_pylist())


def rewrite_instances(root: Path, run_id: str, shard: str, rows: list[Row], marker: str) -> None:
    """Replace a shard's instances file with `rows`, then mark the step (`marker`) done."""
    write_table(root, "instances", run_id, shard, rows)
    mark_shard_done(root, run_id, marker)


@dataclass(frozen=True)
class RunRows:
    """A run's stored rows, read back for a step over the whole run: instances in (instance_id, explainer)
    order, their maps decoded, and the rows of the images that were audited."""

    instances: list[Row]
    maps: dict[Key, np.ndarray]
    images: dict[int, Row]


def read_run(root: Path, run_id: str) -> RunRows:
    """The run's rows as stored now (`query` reads the finished shards' files)."""
    instances = query(root, "SELECT * FROM instances WHERE run_id = ? ORDER BY instance_id, explainer",
                      [run_id]).to_pylist()
    maps = query(root, "SELECT instance_id, explainer, grid_h, grid_w, map FROM maps WHERE run_id = ?", [run_id])
    images = query(root, "SELECT * FROM images WHERE run_id = ? AND status = 'ok'", [run_id]).to_pylist()
    return RunRows(instances, _decoded(maps.to_pylist()), {row["image_id"]: row for row in images})


def write_findings(root: Path, run_id: str, rows: list[Row], columns: Mapping[Key, Row], cues: list[Row]) -> None:
    """Rewrite every shard's instances file from the run's rows (as `read_run` gave them) with each row's
    findings `columns` filled, then the run's candidate `cues` as the findings table."""
    shards: dict[str, list[Row]] = {}
    for row in rows:
        stored = {key: value for key, value in row.items() if key != "run_id"}  # a partition, not a column
        shards.setdefault(row["shard"], []).append(stored | columns[(row["instance_id"], row["explainer"])])
    for shard, shard_rows in sorted(shards.items()):
        write_table(root, "instances", run_id, shard, shard_rows)
    write_table(root, "findings", run_id, RUN_SHARD, [cue | {"shard": RUN_SHARD} for cue in cues])


def faithfulness_selection(root: Path, run_id: str, budget: str) -> dict[str, set[Key]]:
    """Shard -> the (instance_id, explainer) pairs that the budget gives deletion / insertion AUC.

    `all` takes every instance; `flagged` the instances whose flags are set (written with each shard by the
    audit: the one off-object rule of pipeline.findings.flags); `sample:N` N instances of the whole run, the
    same N on every rerun (ordered by a hash of their ids). `none` takes nothing.
    """
    if budget == "none":
        return {}
    where, params = "TRUE", []
    if budget == "flagged":
        where = FLAGGED
    elif budget.startswith("sample:"):
        where = (f"instance_id || '/' || explainer IN (SELECT instance_id || '/' || explainer FROM instances "
                 f"WHERE run_id = ? ORDER BY md5(instance_id || '/' || explainer) LIMIT {int(budget[7:])})")
        params = [run_id]
    rows = query(root, f"SELECT shard, instance_id, explainer FROM instances WHERE run_id = ? AND {where}",
                 [run_id, *params]).to_pylist()
    selection: dict[str, set[Key]] = {}
    for row in rows:
        selection.setdefault(row["shard"], set()).add((row["instance_id"], row["explainer"]))
    return selection


def _decoded(rows: list[Row]) -> dict[Key, np.ndarray]:
    return {(m["instance_id"], m["explainer"]): decode_map(m["map"], m["grid_h"], m["grid_w"]) for m in rows}
