"""The audit flow, as the run's outline: refuse a store of another schema version; mark the run `running`;
plan the shards; submit one audit task per shard to the configured task runner (`flows.runners`: threads,
Dask or Ray) and gather them (a shard shows in `query` once written; catalog.duckdb is rebuilt once, after
the map step); within the faithfulness budget, submit one faithfulness task per shard
and gather; then the findings over the whole run, once every shard is done; mark the run `finished`; last,
the review outputs: the diff against the previous run of the same dataset (`reports.diff`), the HTML
report, the FiftyOne push when asked, and the run's Prefect artifacts. A run that raises, or is
interrupted, is marked `failed` with its error. A finished run whose diff meets a `review.fail_on`
condition stays finished in the store, and its flow run fails (ThresholdBreached), which Prefect
automations can alert on. Each step reports its progress (`pipeline.progress`).

Tasks here only glue: the work is in `pipeline.shard` (rows in, rows out, each worker thread or process on
its own model), the reads and writes in `storage`. A shard's tables are written first and its done-marker last, so
a run killed at any point leaves either a finished shard or one that a rerun rewrites whole; the run id is
the config hash, so rerunning the same command skips finished shards.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, task
from prefect.futures import PrefectFuture, as_completed

from eive_audit.explainers import check_supported, get_explainer
from eive_audit.explainers.aha import check_trained_for
from eive_audit.flows.runners import one_gpu_per_task, started
from eive_audit.pipeline.config import AuditConfig
from eive_audit.pipeline.models.families import family_of_model
from eive_audit.pipeline.progress import step
from eive_audit.pipeline.shard import audit_images, fill_faithfulness, finding_columns, plan_shards, run_findings
from eive_audit.reports.artifacts import publish_run_artifacts
from eive_audit.reports.diff import ThresholdBreached, breached, previous_run, run_diff
from eive_audit.storage.catalog import refresh_catalog
from eive_audit.storage.runs import RunInfo, fail_run, finish_run, report_path, run_summary, start_run, summary_counts
from eive_audit.storage.shards import (ShardWriter, faithfulness_selection, read_run, read_shard_instances,
                                       rewrite_instances, write_findings)
from eive_audit.storage.versions import check_schema_versions
from eive_audit.storage.writer import mark_shard_done, shard_done

T = TypeVar("T")


@task(name="audit-shard")
def audit_shard(config: AuditConfig, shard: str, image_ids: list[int]) -> dict[str, int]:
    """Audit one shard's images and write its tables; a finished shard is skipped."""
    if shard_done(config.out, config.run_id, shard):
        return {"skipped": 1}
    explainers = [get_explainer(name, settings) for name, settings in config.explainers.items()]
    with ShardWriter(config.out, config.run_id, shard) as writer:  # writes a batch while the next is audited
        for part in audit_images(config, explainers, image_ids):
            writer.add(part)
    return {name: writer.counts[name] for name in ("images", "instances", "errors")}


@task(name="faithfulness-shard")
def faithfulness_shard(config: AuditConfig, shard: str, chosen: set[tuple[str, str]]) -> int:
    """Fill deletion / insertion AUC of the chosen instances of one shard and rewrite its instances file."""
    marker = f"{shard}.faithfulness"
    if shard_done(config.out, config.run_id, marker):
        return 0
    rows, maps = read_shard_instances(config.out, config.run_id, shard)
    filled = fill_faithfulness(config, rows, maps, chosen)
    rewrite_instances(config.out, config.run_id, shard, rows, marker)
    return filled


@task(name="findings")
def findings_task(config: AuditConfig) -> dict[str, int]:
    """Flag spurious attention over the whole run, cluster candidate cues and verify them; the findings
    columns go into every shard's instances file and the cues into the `findings` table, then a marker.
    Findings are a pure function of the run's rows, so a rerun after a kill rewrites the same values."""
    if shard_done(config.out, config.run_id, "findings"):
        return {"skipped": 1}
    run = read_run(config.out, config.run_id)
    found = run_findings(config, run.instances, run.maps, run.images)
    write_findings(config.out, config.run_id, run.instances, finding_columns(found), found.cues)
    mark_shard_done(config.out, config.run_id, "findings")
    return {"cues": len(found.cues), "flagged": sum(f.flagged for f in found.instances.values())}


@task(name="write-report")
def write_report_task(store: Path, run_id: str, diff: dict[str, Any] | None = None) -> Path:
    """Write the run's HTML report to `report_path`, with a section on what changed since `diff`'s base run;
    imported here so the flow loads without the report's deps."""
    from eive_audit.reports.html_report import write_report

    return write_report(store, run_id, report_path(store, run_id), diff=diff)


@task(name="push-fiftyone")
def push_fiftyone_task(store: Path, run_id: str, dataset: str) -> dict:
    """Push the run to a FiftyOne dataset; imported here so only runs that push start FiftyOne's database."""
    from eive_audit.reports.fiftyone_push import push_run

    return push_run(store, run_id, dataset)


def _review(config: AuditConfig) -> dict[str, Any]:
    """The finished run's review outputs (the diff against the previous run of its dataset, report,
    FiftyOne, artifacts), as the summary's extra keys."""
    base = previous_run(config.out, config.run_id)
    diff = run_diff(config.out, base, config.run_id) if base else None
    report = None
    if config.review.report:
        with step("writing the report", None):
            report = write_report_task(config.out, config.run_id, diff)
    if config.review.fiftyone_dataset:
        with step("pushing to FiftyOne", None):
            push_fiftyone_task(config.out, config.run_id, config.review.fiftyone_dataset)
    artifacts = publish_run_artifacts(config.out, config.run_id, report, config.review.fiftyone_dataset, diff)
    return {"report": str(report) if report else None, "fiftyone_dataset": config.review.fiftyone_dataset,
            "artifacts": artifacts, "diff": {"base": base, "summary": diff["summary"]} if diff else None}


def _gather(futures: list[PrefectFuture[T]], step_name: str, sizes: list[int] | None = None) -> list[T]:
    """The tasks' results in submission order, reported as progress step `step_name` as they finish (a task
    counts `sizes[i]` units, 1 without sizes). A failed task raises as soon as it ends, and leaving the
    runner's block waits for its running siblings (whose shards finish or stay unmarked) and cancels the
    queued ones."""
    if not futures:
        return []
    units = dict(zip(futures, sizes or [1] * len(futures)))
    with step(step_name, sum(units.values())) as advance:
        for future in as_completed(futures):
            future.result()
            advance(units[future])
    return [future.result() for future in futures]


@flow(name="audit")
def audit(config: AuditConfig) -> dict[str, Any]:
    """Audit a dataset: every shard once, then the catalog, then the review outputs; returns the run summary.

    A deployment (flows.schedule) passes `config` as a JSON dict; Prefect validates it into AuditConfig."""
    started = time.perf_counter()
    check_schema_versions(config.out)  # before anything is written: a mixed store is refused, not extended
    check_supported(config.explainers, family_of_model(config.model))  # before any image is read
    check_trained_for(config)  # a learned explainer's target model
    # paths stored absolute: the report, the push and the diff read them from any working directory
    info = RunInfo(config.run_id, config.config_hash, config.absolute().model_dump_json(), config.model,
                   tuple(config.explainers), datetime.now(timezone.utc), config.task)
    start_run(config.out, info)
    try:
        summary = _run(config)
        finish_run(config.out, info, time.perf_counter() - started, summary_counts(summary))
        review = _review(config)
    except BaseException as exc:  # an interrupt too: the run is `failed` with its error, and a rerun resumes it
        fail_run(config.out, info, time.perf_counter() - started, exc)
        raise
    result = {**summary, "seconds": round(time.perf_counter() - started, 1), **review}
    held = breached(review["diff"], config.review.fail_on) if review["diff"] else []
    if held:  # the run is finished and kept; its flow run fails, for the user's alerts
        raise ThresholdBreached(result, held)
    return result


def _run(config: AuditConfig) -> dict[str, Any]:
    """Every step that writes the run's rows, on the configured task runner; returns the run summary, with the
    seconds the shards and the findings took (so what findings cost next to the audit shows in every run)."""
    with started(config) as runner, one_gpu_per_task(config):
        begun = time.perf_counter()
        try:
            shards = plan_shards(config)
            counts = _gather([runner.submit(audit_shard, {"config": config, "shard": shard, "image_ids": ids})
                              for shard, ids in shards.items()], "auditing images", list(map(len, shards.values())))
        finally:  # once after the map step, failed or not: the views list every shard that got done
            refresh_catalog(config.out, check_versions=False)
        seconds = {"shards_seconds": round(time.perf_counter() - begun, 1)}
        selection = faithfulness_selection(config.out, config.run_id, config.faithfulness.instances)
        _gather([runner.submit(faithfulness_shard, {"config": config, "shard": shard, "chosen": chosen})
                 for shard, chosen in selection.items()], "faithfulness",  # rewrites listed files: no refresh
                list(map(len, selection.values())))
        if config.findings.enabled:  # the reduce: starts once every shard is gathered
            begun = time.perf_counter()
            _gather([runner.submit(findings_task, {"config": config})], "findings")  # on a worker with the model
            refresh_catalog(config.out)
            seconds["findings_seconds"] = round(time.perf_counter() - begun, 1)
    skipped = sum(part.get("skipped", 0) for part in counts)
    return {**run_summary(config.out, config.run_id), "shards_skipped": skipped, **seconds}
