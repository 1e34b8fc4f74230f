"""The audit flow: plan shards, run one task per shard, write its tables, refresh the DuckDB catalog.

A shard's tables are written first and its done-marker last, so a run killed at any point leaves
either a finished shard or one that a rerun rewrites whole (same file names: no duplicates). The run id
is the config hash: rerunning the same command skips finished shards.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import flow, task

from explainers import get_explainer
from pipeline.audit import audit_batch
from pipeline.batching import ImageBatch, iter_batches
from pipeline.config import AuditConfig
from pipeline.evaluation import label_to_category
from pipeline.models.detr import DetrAdapter
from pipeline.sources import CocoSource, FolderSource, ImageRecord, SourceError
from storage.catalog import query, refresh_catalog
from storage.maps import encode_map
from storage.writer import mark_shard_done, shard_done, write_table

TABLES = ("images", "instances", "maps", "errors")


@lru_cache(maxsize=2)
def _adapter(model: str, device: str) -> DetrAdapter:
    """One loaded model per process and (model, device): shards of a run share it."""
    return DetrAdapter.load(model, device)


@lru_cache(maxsize=2)
def _source(images: Path, coco: Path | None) -> CocoSource | FolderSource:
    return CocoSource(coco, images) if coco is not None else FolderSource(images)


def plan_shards(config: AuditConfig) -> dict[str, list[int]]:
    """Shard name -> image ids, in id order; names are stable for a given source and shard size."""
    ids = _source(config.images, config.coco).image_ids
    return {f"s{n:05d}": ids[start:start + config.shard_size]
            for n, start in enumerate(range(0, len(ids), config.shard_size))}


def _error_row(error: SourceError, stage: str) -> dict[str, Any]:
    return {"image_id": error.image_id, "annotation_id": error.annotation_id, "stage": stage,
            "type": error.reason.value, "message": error.message, "path": error.path}


def _exception_row(record: ImageRecord, stage: str, exc: Exception) -> dict[str, Any]:
    return {"image_id": record.image_id, "annotation_id": None, "stage": stage, "type": type(exc).__name__,
            "message": f"{exc}"[:2000], "path": str(record.path)}


@task(name="audit-shard")
def audit_shard(config: AuditConfig, shard: str, image_ids: list[int]) -> dict[str, int]:
    """Audit one shard's images and write its tables; a finished shard is skipped."""
    run_id = config.run_id
    if shard_done(config.out, run_id, shard):
        return {"skipped": 1}
    adapter = _adapter(config.model, config.device)
    source = _source(config.images, config.coco)
    label_map, _ = label_to_category(adapter.label_names, source.categories) if source.categories else ({}, "")
    explainers = [get_explainer(name, **({"fusion": config.fusion} if name == "eive" else {})) for name in config.explainers]
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}
    stream = (item for image_id in image_ids for item in source.read(image_id))
    for item in iter_batches(stream, config.batch_size):
        if isinstance(item, SourceError):
            tables["errors"].append(_error_row(item, "source"))
            continue
        for part in _audit_or_split(adapter, explainers, item, label_map, config, tables["errors"]):
            for name in ("images", "instances", "maps"):
                tables[name].extend(getattr(part, name))
    audited = {row["image_id"] for row in tables["images"]}
    tables["images"] += [{"image_id": e["image_id"], "status": "error", "file_path": e["path"]}
                         for e in tables["errors"] if e["annotation_id"] is None and e["image_id"] not in audited]
    for row in tables["maps"]:
        row["map"] = encode_map(row["map"])
    for name, rows in tables.items():
        write_table(config.out, name, run_id, shard, [{**row, "shard": shard} for row in rows])
    mark_shard_done(config.out, run_id, shard)
    return {"images": len(tables["images"]), "instances": len(tables["instances"]), "errors": len(tables["errors"])}


def _audit_or_split(adapter: DetrAdapter, explainers: list, item: ImageBatch, label_map: dict[int, int],
                    config: AuditConfig, errors: list[dict[str, Any]]) -> list:
    """Audit a batch; if it fails, retry its images one by one so only the culprit becomes an error row."""
    try:
        return [audit_batch(adapter, explainers, item, label_map, config.score_threshold, config.max_detections)]
    except Exception as exc:
        if len(item.records) == 1:
            errors.append(_exception_row(item.records[0], "model", exc))
            return []
        return [part for record, image in zip(item.records, item.images)
                for part in _audit_or_split(adapter, explainers, ImageBatch([record], [image]), label_map, config, errors)]


def _write_run_row(config: AuditConfig, status: str, started: datetime, seconds: float, counts: dict[str, int]) -> None:
    write_table(config.out, "runs", config.run_id, "run", [{
        "config_hash": config.config_hash, "config_json": config.model_dump_json(), "created_at": started,
        "finished_at": datetime.now(timezone.utc) if status == "finished" else None, "status": status,
        "model": config.model, "explainers": ",".join(config.explainers), "seconds": seconds,
        "n_images": counts.get("images", 0), "n_instances": counts.get("instances", 0), "n_errors": counts.get("errors", 0),
    }])


def run_summary(store: Path, run_id: str) -> dict[str, Any]:
    """Counts of the run read back through DuckDB: images, errors, instances by outcome."""
    outcomes = query(store, "SELECT outcome, count(*) AS n FROM instances WHERE run_id = ? GROUP BY outcome "
                            "ORDER BY outcome", [run_id])

    def count(table: str) -> int:
        return query(store, f"SELECT count(*) AS n FROM {table} WHERE run_id = ?", [run_id]).column("n")[0].as_py()

    return {"run_id": run_id, "images": count("images"), "errors": count("errors"),
            "instances": dict(zip(outcomes.column("outcome").to_pylist(), outcomes.column("n").to_pylist()))}


@flow(name="audit")
def audit(config: AuditConfig) -> dict[str, Any]:
    """Audit a dataset: every shard once, then the catalog; returns the run summary."""
    started_at, started = datetime.now(timezone.utc), time.perf_counter()
    Path(config.out).mkdir(parents=True, exist_ok=True)
    _write_run_row(config, "running", started_at, 0.0, {})
    totals: dict[str, int] = {}
    for shard, ids in plan_shards(config).items():
        for key, value in audit_shard(config, shard, ids).items():
            totals[key] = totals.get(key, 0) + value
    refresh_catalog(config.out)
    summary = run_summary(config.out, config.run_id)
    counts = {"images": summary["images"], "instances": sum(summary["instances"].values()), "errors": summary["errors"]}
    _write_run_row(config, "finished", started_at, time.perf_counter() - started, counts)
    refresh_catalog(config.out)
    return {**summary, "seconds": round(time.perf_counter() - started, 1), "shards_skipped": totals.get("skipped", 0)}
