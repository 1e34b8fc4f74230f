"""The audit flow: plan shards, run one task per shard, write its tables, refresh the DuckDB catalog;
then, within the faithfulness budget, a second pass per shard fills deletion / insertion AUC; last, the
review outputs: the HTML report, the FiftyOne push when asked, and the run's Prefect artifacts.

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

from eive_audit.explainers import get_explainer
from eive_audit.pipeline.audit import audit_batch, faithfulness_of_rows, model_labels
from eive_audit.pipeline.batching import ImageBatch, iter_batches
from eive_audit.pipeline.config import AuditConfig
from eive_audit.pipeline.findings import Findings, find_spurious
from eive_audit.pipeline.evaluation import label_to_category
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.sources import CocoSource, FolderSource, ImageRecord, SourceError
from eive_audit.reports.artifacts import publish_run_artifacts
from eive_audit.storage.catalog import query, refresh_catalog
from eive_audit.storage.maps import decode_map, encode_map
from eive_audit.storage.writer import mark_shard_done, read_table, shard_done, write_table

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


def _model_and_source(config: AuditConfig) -> tuple[DetrAdapter, CocoSource | FolderSource, dict[int, int]]:
    """The cached model and source, and the map model label -> dataset category id."""
    adapter = _adapter(config.model, config.device)
    source = _source(config.images, config.coco)
    label_map, _ = label_to_category(adapter.label_names, source.categories) if source.categories else ({}, "")
    return adapter, source, label_map


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
    adapter, source, label_map = _model_and_source(config)
    explainers = [get_explainer(name, settings) for name, settings in config.explainers.items()]
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
        return [audit_batch(adapter, explainers, item, label_map, config.score_threshold, config.max_detections,
                            annotated=config.coco is not None)]
    except Exception as exc:
        if len(item.records) == 1:
            errors.append(_exception_row(item.records[0], "model", exc))
            return []
        return [part for record, image in zip(item.records, item.images)
                for part in _audit_or_split(adapter, explainers, ImageBatch([record], [image]), label_map, config, errors)]


def faithfulness_selection(config: AuditConfig) -> dict[str, set[tuple[str, str]]]:
    """Shard -> (instance_id, explainer) pairs that the budget gives deletion / insertion AUC.

    `flagged` takes correct detections whose map has little mass on their object; `sample:N` takes N
    instances of the whole run, the same N on every rerun (ordered by a hash of their ids).
    """
    budget = config.faithfulness.instances
    where, params = "TRUE", []
    if budget == "flagged":
        where, params = "outcome = 'tp' AND mass_in_gt < ?", [1 - config.findings.off_object]
    elif budget.startswith("sample:"):
        where = (f"instance_id || '/' || explainer IN (SELECT instance_id || '/' || explainer FROM instances "
                 f"WHERE run_id = ? ORDER BY md5(instance_id || '/' || explainer) LIMIT {int(budget[7:])})")
        params = [config.run_id]
    rows = query(config.out, f"SELECT shard, instance_id, explainer FROM instances WHERE run_id = ? AND {where}",
                 [config.run_id, *params]).to_pylist()
    selection: dict[str, set[tuple[str, str]]] = {}
    for row in rows:
        selection.setdefault(row["shard"], set()).add((row["instance_id"], row["explainer"]))
    return selection


@task(name="faithfulness-shard")
def faithfulness_shard(config: AuditConfig, shard: str, chosen: set[tuple[str, str]]) -> int:
    """Fill deletion / insertion AUC of the chosen instances of one shard and rewrite its instances file."""
    marker = f"{shard}.faithfulness"
    if shard_done(config.out, config.run_id, marker):
        return 0
    adapter, source, label_map = _model_and_source(config)
    instances = read_table(config.out, "instances", config.run_id, shard).to_pylist()
    maps = {(m["instance_id"], m["explainer"]): decode_map(m["map"], m["grid_h"], m["grid_w"])
            for m in read_table(config.out, "maps", config.run_id, shard).to_pylist()}
    rows = [row for row in instances if (row["instance_id"], row["explainer"]) in chosen]
    settings = config.faithfulness
    stream = (item for image_id in sorted({row["image_id"] for row in rows}) for item in source.read(image_id))
    for item in iter_batches(stream, config.batch_size):
        if not isinstance(item, ImageBatch):
            continue  # phase one read this image, so only its bad annotations come back here
        ids = {record.image_id for record in item.records}
        mine = [row for row in rows if row["image_id"] in ids]
        result = faithfulness_of_rows(adapter, item, mine, [maps[(r["instance_id"], r["explainer"])] for r in mine],
                                      label_map, settings)
        for row, deletion, insertion in zip(mine, result.deletion_auc.tolist(), result.insertion_auc.tolist()):
            row |= {"deletion_auc": deletion, "insertion_auc": insertion, "faithfulness_steps": settings.steps}
    write_table(config.out, "instances", config.run_id, shard, instances)
    mark_shard_done(config.out, config.run_id, marker)
    return len(rows)


@task(name="findings")
def findings_task(config: AuditConfig) -> dict[str, int]:
    """Flag spurious attention over the whole run, cluster candidate cues and verify them; the findings
    columns go into every shard's instances file and the cues into the `findings` table, then a marker.
    Findings are a pure function of the run's rows, so a rerun after a kill rewrites the same values."""
    if shard_done(config.out, config.run_id, "findings"):
        return {"skipped": 1}
    adapter, _, label_map = _model_and_source(config)
    rows = query(config.out, "SELECT * FROM instances WHERE run_id = ? ORDER BY instance_id, explainer",
                 [config.run_id]).to_pylist()
    maps = {(m["instance_id"], m["explainer"]): decode_map(m["map"], m["grid_h"], m["grid_w"])
            for m in query(config.out, "SELECT instance_id, explainer, grid_h, grid_w, map FROM maps WHERE run_id = ?",
                           [config.run_id]).to_pylist()}
    images = {row["image_id"]: row for row in query(config.out, "SELECT * FROM images WHERE run_id = ? AND status = 'ok'",
                                                    [config.run_id]).to_pylist()}
    labels = dict(zip(((r["instance_id"], r["explainer"]) for r in rows), model_labels(adapter, rows, label_map)))
    found = find_spurious(adapter, rows, maps, images, labels, config.findings, config.batch_size)
    _write_findings(config, rows, found)
    mark_shard_done(config.out, config.run_id, "findings")
    return {"cues": len(found.cues), "flagged": sum(f.flagged for f in found.instances.values())}


def _write_findings(config: AuditConfig, rows: list[dict[str, Any]], found: Findings) -> None:
    """Rewrite each shard's instances file from the run's rows (as read for the findings) with the findings
    columns filled, then the run's candidate cues."""
    shards: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        f = found.instances[(row["instance_id"], row["explainer"])]
        shards.setdefault(row["shard"], []).append({key: value for key, value in row.items() if key != "run_id"} | {
            "off_object_share": f.off_object_share, "spurious_score": f.spurious_score,
            "flag_off_object": f.flag_off_object, "flag_background_fp": f.flag_background_fp,
            "flag_miss_elsewhere": f.flag_miss_elsewhere, "cue_id": f.cue_id, "verification_drop": f.verification_drop,
            "localised_drop": f.localised_drop, "specificity": f.specificity,
            "peak_x": f.peak_xy[0] if f.peak_xy else None, "peak_y": f.peak_xy[1] if f.peak_xy else None})
    for shard, shard_rows in sorted(shards.items()):
        write_table(config.out, "instances", config.run_id, shard, shard_rows)
    write_table(config.out, "findings", config.run_id, "run", [cue | {"shard": "run"} for cue in found.cues])


def _write_run_row(config: AuditConfig, status: str, started: datetime, seconds: float, counts: dict[str, int]) -> None:
    write_table(config.out, "runs", config.run_id, "run", [{
        "config_hash": config.config_hash, "config_json": config.model_dump_json(), "created_at": started,
        "finished_at": datetime.now(timezone.utc) if status == "finished" else None, "status": status,
        "model": config.model, "explainers": ",".join(config.explainers), "seconds": seconds,
        "n_images": counts.get("images", 0), "n_instances": counts.get("instances", 0), "n_errors": counts.get("errors", 0),
    }])


def run_summary(store: Path, run_id: str) -> dict[str, Any]:
    """Counts of the run read back through DuckDB: images, errors, instances by outcome, flagged instances
    and candidate cues."""
    outcomes = query(store, "SELECT outcome, count(*) AS n FROM instances WHERE run_id = ? GROUP BY outcome "
                            "ORDER BY outcome", [run_id])

    def count(table: str) -> int:
        return query(store, f"SELECT count(*) AS n FROM {table} WHERE run_id = ?", [run_id]).column("n")[0].as_py()

    def count_where(condition: str) -> int:
        return query(store, f"SELECT count(*) AS n FROM instances WHERE run_id = ? AND {condition}",
                     [run_id]).column("n")[0].as_py()

    return {"run_id": run_id, "images": count("images"), "errors": count("errors"),
            "instances": dict(zip(outcomes.column("outcome").to_pylist(), outcomes.column("n").to_pylist())),
            "with_faithfulness": count_where("insertion_auc IS NOT NULL"),
            "flagged": count_where("(flag_off_object OR flag_background_fp OR flag_miss_elsewhere)"),
            "candidate_cues": count("findings")}


def report_path(store: Path, run_id: str) -> Path:
    """Where a run's HTML report goes by default: beside its tables, named by the run."""
    return Path(store) / "reports" / f"{run_id}.html"


@task(name="write-report")
def write_report_task(store: Path, run_id: str) -> Path:
    """Write the run's HTML report to `report_path`; imported here so the flow loads without the report's deps."""
    from eive_audit.reports.html_report import write_report

    return write_report(store, run_id, report_path(store, run_id))


@task(name="push-fiftyone")
def push_fiftyone_task(store: Path, run_id: str, dataset: str) -> dict:
    """Push the run to a FiftyOne dataset; imported here so only runs that push start FiftyOne's database."""
    from eive_audit.reports.fiftyone_push import push_run

    return push_run(store, run_id, dataset)


def _review(config: AuditConfig) -> dict[str, Any]:
    """The finished run's review outputs (report, FiftyOne, artifacts), as the summary's extra keys."""
    report = write_report_task(config.out, config.run_id) if config.review.report else None
    if config.review.fiftyone_dataset:
        push_fiftyone_task(config.out, config.run_id, config.review.fiftyone_dataset)
    artifacts = publish_run_artifacts(config.out, config.run_id, report, config.review.fiftyone_dataset)
    return {"report": str(report) if report else None, "fiftyone_dataset": config.review.fiftyone_dataset,
            "artifacts": artifacts}


@flow(name="audit")
def audit(config: AuditConfig) -> dict[str, Any]:
    """Audit a dataset: every shard once, then the catalog, then the review outputs; returns the run summary.

    A deployment (flows.schedule) passes `config` as a JSON dict; Prefect validates it into AuditConfig."""
    started_at, started = datetime.now(timezone.utc), time.perf_counter()
    Path(config.out).mkdir(parents=True, exist_ok=True)
    _write_run_row(config, "running", started_at, 0.0, {})
    totals: dict[str, int] = {}
    for shard, ids in plan_shards(config).items():
        for key, value in audit_shard(config, shard, ids).items():
            totals[key] = totals.get(key, 0) + value
    refresh_catalog(config.out)
    if config.faithfulness.instances != "none":
        for shard, chosen in faithfulness_selection(config).items():
            faithfulness_shard(config, shard, chosen)
    if config.findings.enabled:
        findings_task(config)
        refresh_catalog(config.out)
    summary = run_summary(config.out, config.run_id)
    counts = {"images": summary["images"], "instances": sum(summary["instances"].values()), "errors": summary["errors"]}
    _write_run_row(config, "finished", started_at, time.perf_counter() - started, counts)  # the runs view globs it
    seconds = round(time.perf_counter() - started, 1)
    return {**summary, "seconds": seconds, "shards_skipped": totals.get("skipped", 0), **_review(config)}
