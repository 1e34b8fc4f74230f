"""The Parquet schema of every table, declared once so writers and the catalog cannot drift apart.

Every table is hive-partitioned by `run_id` (`<root>/<table>/run_id=<id>/<shard>.parquet`), so `run_id`
is a directory name, not a column in the files; DuckDB adds it back as a VARCHAR column.
"""

from __future__ import annotations

import pyarrow as pa

# 2: images gained input_* and padded_* sizes; 3: findings; 4: localised drop, specificity; 5: off_object_share
# and the flag_* columns are written with each shard by the audit (phase one), no longer by the findings step;
# 6: runs.error and the failed status, the crowd outcome, images.exif_orientation; 7: instances.off_object_norm and
# flag_reason (resolution-aware flags); 8: runs.task and instances.task (classification audits), their outcomes
SCHEMA_VERSION = 8
SCHEMA_VERSION_KEY = b"eive_audit_schema_version"
# An instances row that any off-object flag marks (the flags are written with each shard), as SQL: what the
# `flagged` faithfulness budget selects and the run summary counts.
FLAGGED = "(flag_off_object OR flag_background_fp OR flag_miss_elsewhere)"

# Values a string column may take; the writer refuses anything else so SQL filters can rely on them.
ALLOWED_VALUES: dict[tuple[str, str], frozenset[str]] = {
    # a detector's (matching), then a classifier's: its predicted class right or wrong, the true class of a wrong one
    ("instances", "outcome"): frozenset({"tp", "fp", "dup", "crowd", "fn", "det", "correct", "wrong", "missed"}),
    ("instances", "task"): frozenset({"detect", "classify"}),
    ("runs", "status"): frozenset({"running", "finished", "failed"}),
    ("runs", "task"): frozenset({"detect", "classify"}),
}


def _schema(*fields: pa.Field) -> pa.Schema:
    """A schema stamped with SCHEMA_VERSION, so a reader can tell which layout a file was written with."""
    return pa.schema(list(fields), metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


def _required(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _optional(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=True)


_UTC = pa.timestamp("us", tz="UTC")

# One row per audit run: its configuration, lifetime and totals.
RUNS = _schema(
    _required("config_hash", pa.string()),
    _required("config_json", pa.string()),
    _required("created_at", _UTC),
    _optional("finished_at", _UTC),
    _required("status", pa.string()),
    _required("model", pa.string()),
    _required("task", pa.string()),  # detect or classify
    _required("explainers", pa.string()),  # comma-separated explainer names
    _required("n_images", pa.int64()),
    _required("n_instances", pa.int64()),
    _required("n_errors", pa.int64()),
    _required("seconds", pa.float64()),
    _optional("error", pa.string()),  # why a `failed` run stopped: "<exception type>: <message>"
)

# One row per image of the source: its size, counts, status and timings. An image that failed
# (status "error", details in `errors`) has nulls where nothing could be measured.
IMAGES = _schema(
    _required("image_id", pa.int64()),
    _required("shard", pa.string()),
    _optional("file_path", pa.string()),
    _optional("width", pa.int32()),
    _optional("height", pa.int32()),
    # The model input after resize (input_*) and the batch's padded size (padded_*): a stored map covers the
    # padded input, so the image occupies its top-left input/padded fraction (see reports.overlay).
    _optional("input_height", pa.int32()),
    _optional("input_width", pa.int32()),
    _optional("padded_height", pa.int32()),
    _optional("padded_width", pa.int32()),
    # The EXIF orientation tag applied when reading the file (pipeline.sources.decode), null without one:
    # width / height and every stored coordinate are of the image as displayed, after it.
    _optional("exif_orientation", pa.int8()),
    _optional("n_gt", pa.int32()),
    _optional("n_detections", pa.int32()),
    _required("status", pa.string()),
    _optional("forward_ms", pa.float32()),
    _optional("explain_ms", pa.float32()),
)

# One row per (explained prediction or missed ground truth, explainer): match, box and map scores.
INSTANCES = _schema(
    _required("instance_id", pa.string()),
    _required("image_id", pa.int64()),
    _required("shard", pa.string()),
    _required("explainer", pa.string()),
    _required("task", pa.string()),  # detect or classify: a store may hold runs of both
    # detect: tp, fp, dup, crowd, fn, or det in a source without GT; classify: correct / wrong (the predicted
    # class, whose box is the whole image) and missed (the true class of a wrong prediction), or det unlabelled
    _required("outcome", pa.string()),
    _required("query", pa.int32()),
    _optional("label", pa.int64()),  # dataset category id (classify: class id of the index or ImageFolder)
    _required("label_name", pa.string()),
    _required("score", pa.float32()),
    _required("pred_x0", pa.float32()),
    _required("pred_y0", pa.float32()),
    _required("pred_x1", pa.float32()),
    _required("pred_y1", pa.float32()),
    _optional("gt_annotation_id", pa.int64()),
    _optional("gt_x0", pa.float32()),
    _optional("gt_y0", pa.float32()),
    _optional("gt_x1", pa.float32()),
    _optional("gt_y1", pa.float32()),
    _optional("iou", pa.float32()),  # with the GT box; for crowd, the share of the prediction inside the region
    _optional("mass_in_pred", pa.float32()),  # null when the map has no mass at all (nothing to locate)
    _optional("mass_in_gt", pa.float32()),
    _optional("mass_on_other_gt", pa.float32()),
    _optional("peak_in_gt", pa.bool_()),
    _optional("compactness", pa.float32()),
    _optional("deletion_auc", pa.float32()),
    _optional("insertion_auc", pa.float32()),
    _optional("faithfulness_steps", pa.int32()),
    # off_object_share and flag_*: the off-object rule (pipeline.findings.flags), written with the shard by the
    # audit and read by the faithfulness budget, the findings step, the report and the FiftyOne views alike.
    # The rest is filled by the findings step at the end of the run (pipeline.findings); null until then.
    _optional("off_object_share", pa.float32()),  # raw: mass outside the object's box
    _optional("off_object_norm", pa.float32()),  # on cells out of the object's reach at the grid: what flags read
    _optional("spurious_score", pa.float32()),
    _optional("flag_off_object", pa.bool_()),
    _optional("flag_background_fp", pa.bool_()),
    _optional("flag_miss_elsewhere", pa.bool_()),
    _optional("flag_reason", pa.string()),  # why the instance is flagged, in words; null when it is not
    _optional("cue_id", pa.string()),
    _optional("verification_drop", pa.float32()),  # relative score drop with the surroundings blurred
    _optional("localised_drop", pa.float32()),  # the same with only the most damaging small window blurred
    _optional("specificity", pa.float32()),  # localised drop minus the median tile's drop
    _optional("peak_x", pa.float32()),  # centre of the peak window (localised) or attention peak cell, original px
    _optional("peak_y", pa.float32()),
)

# One row per (instance, explainer): the saliency map at attention-grid resolution (storage.maps encodes it).
MAPS = _schema(
    _required("instance_id", pa.string()),
    _required("image_id", pa.int64()),
    _required("shard", pa.string()),
    _required("explainer", pa.string()),
    _required("grid_h", pa.int32()),
    _required("grid_w", pa.int32()),
    _required("map", pa.binary()),  # float16 little-endian, row-major, grid_h * grid_w values
)

# One row per failure (unreadable image, bad annotation, explainer crash), kept instead of aborting the run.
ERRORS = _schema(
    _optional("image_id", pa.int64()),
    _optional("annotation_id", pa.int64()),
    _required("shard", pa.string()),
    _required("stage", pa.string()),
    _required("type", pa.string()),
    _required("message", pa.string()),
    _optional("path", pa.string()),
)

# One row per candidate cue: a cluster of flagged instances of one class whose off-object peaks look alike.
FINDINGS = _schema(
    _required("cue_id", pa.string()),  # "<explainer>:<class>:<rank>", rank 0 the largest cluster
    _required("shard", pa.string()),
    _required("explainer", pa.string()),
    _required("label_name", pa.string()),
    _required("support", pa.int32()),
    _required("flagged_in_class", pa.int32()),
    _required("mean_spurious_score", pa.float32()),
    _required("offset_x", pa.float32()),  # peak position from the box centre, in box widths
    _required("offset_y", pa.float32()),  # ... and box heights
    _required("colour_mean", pa.list_(pa.float32())),
    _required("colour_std", pa.list_(pa.float32())),
    _required("exemplar_ids", pa.list_(pa.string())),
    _required("exemplar_crops", pa.list_(pa.binary())),  # PNG bytes around each exemplar's peak
    _required("verified", pa.int32()),
    _optional("verification_drop", pa.float32()),  # mean relative score drop with the peak region blurred
    _required("confirmed", pa.bool_()),
)

# The tables written as one file per run (shard "run", replaced whole); the others have one file per shard,
# which counts once the shard's done-marker exists (storage.catalog).
RUN_TABLES = frozenset({"runs", "findings"})

SCHEMAS: dict[str, pa.Schema] = {
    "runs": RUNS,
    "images": IMAGES,
    "instances": INSTANCES,
    "maps": MAPS,
    "errors": ERRORS,
    "findings": FINDINGS,
}
