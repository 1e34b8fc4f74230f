"""The work the audit flow hands to its tasks, as rows in and rows out (storage reads and writes them):
plan the shards, audit one shard's images, fill the faithfulness of one shard's chosen rows, and the
findings over the whole run's rows.

Tasks run on worker threads, and each thread loads its own model (`worker_model`): the adapter adds hooks
to its module at every forward, so one module used by two threads at once would mix their attention maps.
Every result is a function of its inputs alone, so a run on several workers writes exactly the rows of a
run on one.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from eive_audit.pipeline.audit import BatchExplainer, BatchRows, audit_batch, faithfulness_of_rows, model_labels
from eive_audit.pipeline.audit_classify import classify_batch
from eive_audit.pipeline.batching import ImageBatch, iter_batches
from eive_audit.pipeline.config import AuditConfig
from eive_audit.pipeline.findings import Findings, find_spurious
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.models.loading import load_model
from eive_audit.pipeline.models.vit import ViTAdapter
from eive_audit.pipeline.models.labels import label_to_category
from eive_audit.pipeline.sources import ImageRecord, Source, SourceError, open_source

Key = tuple[str, str]  # (instance_id, explainer)
Adapter = DetrAdapter | ViTAdapter
Row = dict[str, Any]

_worker = threading.local()


_slots = itertools.count()  # worker threads of this process, numbered in the order they first load a model
_slots_lock = threading.Lock()


def worker_device(device: str) -> str:
    """The device this thread's model goes on: `cuda` (or `auto` with GPUs) where several GPUs are visible
    spreads worker threads over them, one GPU each in turn (`--workers` defaults to one per GPU); any other
    device as given. A Dask or Ray worker process sees one GPU (`flows.runners`), so it keeps `cuda`."""
    if device not in ("auto", "cuda") or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return device
    if not hasattr(_worker, "slot"):
        with _slots_lock:
            _worker.slot = next(_slots)
    return f"cuda:{_worker.slot % torch.cuda.device_count()}"


def worker_model(model: str, device: str) -> Adapter:
    """This thread's loaded model for (model, device): loaded on the thread's first call and kept for its
    next tasks, never handed to another thread. A thread keeps one model, so a worker asked for another
    drops the old one."""
    device = worker_device(device)
    key = (model, device)
    if getattr(_worker, "key", None) != key:
        _worker.adapter, _worker.key = load_model(model, device), key
    return _worker.adapter


def plan_shards(config: AuditConfig) -> dict[str, list[int]]:
    """Shard name -> image ids, in id order; names are stable for a given source and shard size. A source
    without images still gets one shard, empty, which stores the errors found when it was opened."""
    ids = open_source(config.images, config.coco, config.index, config.task).image_ids
    return {f"s{n:05d}": ids[start:start + config.shard_size]
            for n, start in enumerate(range(0, max(len(ids), 1), config.shard_size))}


def model_and_source(config: AuditConfig) -> tuple[Adapter, Source, dict[int, int]]:
    """This thread's model, the source, and the map model label -> dataset category id; the process's torch
    on `config.torch_threads` CPU threads where set (a process-wide setting: every worker asks the same)."""
    if config.torch_threads and torch.get_num_threads() != config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    adapter = worker_model(config.model, config.device)
    source = open_source(config.images, config.coco, config.index, config.task)
    label_map, _ = label_to_category(adapter.label_names, source.categories) if source.categories else ({}, "")
    return adapter, source, label_map


def audit_images(config: AuditConfig, explainers: list[BatchExplainer],
                 image_ids: list[int]) -> Iterator[dict[str, list[Row]]]:
    """The rows of one shard's tables (images, instances, maps with float maps, errors) for `image_ids`, part
    by part as they are computed (a batch, or an error), so the caller can write one part while the next is
    computed; the rows in order are the shard's.

    A source error becomes an `errors` row (those found when the source was opened go with the shard of
    its first image, so each is stored once a run); a batch that fails is retried image by image so only the
    culprit becomes one; an image that never got audited still has its `images` row, status `error` (the
    last part)."""
    adapter, source, label_map = model_and_source(config)
    opened = source.open_errors if image_ids[:1] == source.image_ids[:1] else ()
    stream = itertools.chain(opened, (item for image_id in image_ids for item in source.read(image_id)))
    audited: set[int] = set()
    failed: dict[int, str | None] = {}  # one row per image, though entries that share its id fail apiece
    for item in iter_batches(stream, config.batch_size, adapter.preprocess_config.longest_edge,
                             config.decode_threads, pin=adapter.device.type == "cuda"):
        part: dict[str, list[Row]] = {"images": [], "instances": [], "maps": [], "errors": []}
        if isinstance(item, SourceError):
            part["errors"].append(_error_row(item, "source"))
        else:
            for rows in _audit_or_split(adapter, explainers, item, label_map, config, part["errors"]):
                for name in ("images", "instances", "maps"):
                    part[name].extend(getattr(rows, name))
        audited.update(row["image_id"] for row in part["images"])
        for error in part["errors"]:
            if error["annotation_id"] is None:
                failed.setdefault(error["image_id"], error["path"])
        yield part
    yield {"images": [{"image_id": image_id, "status": "error", "file_path": path}
                      for image_id, path in failed.items() if image_id not in audited]}


def _audit_or_split(adapter: Adapter, explainers: list[BatchExplainer], item: ImageBatch,
                    label_map: dict[int, int], config: AuditConfig, errors: list[Row]) -> list[BatchRows]:
    """Audit a batch; if it fails, retry its images one by one so only the culprit becomes an error row."""
    try:
        if config.task == "classify":
            return [classify_batch(adapter, explainers, item, label_map, findings=config.findings)]  # type: ignore[arg-type]
        return [audit_batch(adapter, explainers, item, label_map, config.score_threshold, config.max_detections,
                            annotated=config.coco is not None, findings=config.findings)]
    except Exception as exc:
        if len(item.records) == 1:
            errors.append(_exception_row(item.records[0], "model", exc))
            return []
        return [part for record, image in zip(item.records, item.images)
                for part in _audit_or_split(adapter, explainers, ImageBatch([record], [image]), label_map, config,
                                            errors)]


def _error_row(error: SourceError, stage: str) -> Row:
    return {"image_id": error.image_id, "annotation_id": error.annotation_id, "stage": stage,
            "type": error.reason.value, "message": error.message, "path": error.path}


def _exception_row(record: ImageRecord, stage: str, exc: Exception) -> Row:
    return {"image_id": record.image_id, "annotation_id": None, "stage": stage, "type": type(exc).__name__,
            "message": f"{exc}"[:2000], "path": str(record.path)}


def fill_faithfulness(config: AuditConfig, rows: list[Row], maps: dict[Key, np.ndarray], chosen: set[Key]) -> int:
    """Fill deletion / insertion AUC (and the step count) into the `chosen` rows of one shard, in place;
    returns how many were filled."""
    adapter, source, label_map = model_and_source(config)
    picked = [row for row in rows if (row["instance_id"], row["explainer"]) in chosen]
    settings = config.faithfulness
    stream = (item for image_id in sorted({row["image_id"] for row in picked}) for item in source.read(image_id))
    for item in iter_batches(stream, config.batch_size, adapter.preprocess_config.longest_edge,
                             config.decode_threads, pin=adapter.device.type == "cuda"):
        if not isinstance(item, ImageBatch):
            continue  # the audit read this image, so only its bad annotations come back here
        ids = {record.image_id for record in item.records}
        mine = [row for row in picked if row["image_id"] in ids]
        result = faithfulness_of_rows(adapter, item, mine, [maps[(r["instance_id"], r["explainer"])] for r in mine],
                                      label_map, settings)
        for row, deletion, insertion in zip(mine, result.deletion_auc.tolist(), result.insertion_auc.tolist()):
            row |= {"deletion_auc": deletion, "insertion_auc": insertion, "faithfulness_steps": settings.steps}
    return len(picked)


def run_findings(config: AuditConfig, rows: list[Row], maps: dict[Key, np.ndarray], images: dict[int, Row]) -> Findings:
    """Findings of the whole run from its stored rows (instances in a fixed order, maps, audited images)."""
    adapter, _, label_map = model_and_source(config)
    labels = dict(zip(((r["instance_id"], r["explainer"]) for r in rows), model_labels(adapter, rows, label_map)))
    return find_spurious(adapter, rows, maps, images, labels, config.findings, config.batch_size,
                         config.score_threshold)


def finding_columns(found: Findings) -> dict[Key, Row]:
    """The instances columns that findings fill, per (instance_id, explainer); the off-object share and flags
    were written with the shard (pipeline.audit) and findings only read them."""
    return {key: {"spurious_score": f.spurious_score, "cue_id": f.cue_id,
                  "verification_drop": f.verification_drop, "localised_drop": f.localised_drop,
                  "specificity": f.specificity, "peak_x": f.peak_xy[0] if f.peak_xy else None,
                  "peak_y": f.peak_xy[1] if f.peak_xy else None}
            for key, f in found.instances.items()}
