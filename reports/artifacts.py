"""Prefect artifacts of a finished audit run: a markdown summary (counts, flags, cues, where to review it), a
table of the worst correct detections (a classifier's: correct predictions), and what changed since the
previous run of the dataset (reports.diff).

They put the run's outcome on the flow run's page in the Prefect UI, where a scheduled audit is seen,
so nobody has to open the store to learn whether last night's audit found something. Both are read back
from the store through DuckDB, so they show what was written, not what the flow meant to write. Keys
name the run (`audit-<run_id>-summary`), so each rerun adds a version under the same key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from eive_audit.pipeline.config import OUTCOME_ROLES, sql_outcome_in
from eive_audit.reports.diff import diff_markdown
from eive_audit.reports.views import open_command
from eive_audit.storage.catalog import query
from eive_audit.storage.schema import FLAGGED

WORST_LIMIT = 20
CUES_LISTED = 10

# Correct detections (or a classifier's correct predictions) whose map puts the least mass on their object:
# "right for the wrong reasons" first.
_WORST_SQL = f"""
SELECT instance_id, image_id, explainer, label_name, round(score::DOUBLE, 3) AS score,
       round(iou::DOUBLE, 3) AS iou, round(mass_in_gt::DOUBLE, 3) AS mass_in_gt,
       round(mass_in_pred::DOUBLE, 3) AS mass_in_pred, peak_in_gt
FROM instances WHERE run_id = ? AND {sql_outcome_in("tp")} AND mass_in_gt IS NOT NULL
ORDER BY mass_in_gt, instance_id, explainer LIMIT ?
"""

_RUN_SQL = """
SELECT status, model, task, explainers, n_images, n_instances, n_errors, round(seconds, 1) AS seconds
FROM runs WHERE run_id = ?
"""

# What the flag columns mark, and what the worst table lists, in a detector's and in a classifier's words.
_FLAG_WORDS = {"detect": ("off object", "background false positives", "misses looking elsewhere"),
               "classify": ("correct predictions off their object", "wrong predictions driven by background",
                            "true classes looked for elsewhere")}
_WORST_WORDS = {"detect": "correct detections", "classify": "correct predictions"}

_TIMING_SQL = """
SELECT round(median(forward_ms::DOUBLE), 1) AS forward_ms, round(median(explain_ms::DOUBLE), 1) AS explain_ms,
       round(sum(forward_ms::DOUBLE) / 1000, 1) AS forward_s, round(sum(explain_ms::DOUBLE) / 1000, 1) AS explain_s
FROM images WHERE run_id = ? AND status != 'error'
"""

_OUTCOMES_SQL = "SELECT outcome, count(*) AS n FROM instances WHERE run_id = ? GROUP BY outcome ORDER BY outcome"

_FLAGGED_SQL = f"""
SELECT count(*) FILTER ({FLAGGED}) AS flagged, count(*) FILTER (flag_off_object) AS off_object,
       count(*) FILTER (flag_background_fp) AS background_fp, count(*) FILTER (flag_miss_elsewhere) AS miss_elsewhere
FROM instances WHERE run_id = ?
"""

_CUES_SQL = """
SELECT cue_id, label_name, support, round(verification_drop::DOUBLE, 3) AS drop, confirmed FROM findings
WHERE run_id = ? ORDER BY confirmed DESC, support DESC, cue_id
"""


def artifact_key(*parts: str) -> str:
    """A valid Prefect artifact key from `parts`: Prefect accepts lowercase letters, digits and dashes only,
    and silently keeps an artifact with a bad key off the Artifacts page, so anything else becomes a dash."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    if not key:
        raise ValueError(f"no artifact key can be made from {parts!r}")
    return key


def worst_detections(store: Path, run_id: str, limit: int = WORST_LIMIT) -> list[dict[str, Any]]:
    """The `limit` correct detections (or correct predictions) of the run with the least saliency mass inside
    their GT box (a classifier's: the object box of the class)."""
    return query(store, _WORST_SQL, [run_id, limit]).to_pylist()


def summary_markdown(store: Path, run_id: str, report: Path | None, fiftyone_dataset: str | None) -> str:
    """The run's counts and timings as markdown, with where to review it (HTML report, FiftyOne dataset)."""
    runs = query(store, _RUN_SQL, [run_id]).to_pylist()
    if not runs:
        raise KeyError(f"no run {run_id!r} in the store at {store}")
    run, timing = runs[0], query(store, _TIMING_SQL, [run_id]).to_pylist()[0]
    counts = {row["outcome"]: row["n"] for row in query(store, _OUTCOMES_SQL, [run_id]).to_pylist()}
    outcomes = ", ".join(f"{outcome} {counts[outcome]}" for outcome in OUTCOME_ROLES if outcome in counts)  # right first
    flags = query(store, _FLAGGED_SQL, [run_id]).to_pylist()[0]
    cues = query(store, _CUES_SQL, [run_id]).to_pylist()
    off_object, background, elsewhere = _FLAG_WORDS[run["task"]]
    lines = [
        f"# Audit `{run_id}`",
        "",
        "| | |",
        "|---|---|",
        f"| status | {run['status']} |",
        f"| model | `{run['model']}` |",
        f"| explainers | {run['explainers']} |",
        f"| images | {run['n_images']} |",
        f"| instances | {run['n_instances']} ({outcomes or 'none'}) |",
        f"| errors | {run['n_errors']} |",
        f"| run time | {run['seconds']} s |",
        f"| forward, per image (median) | {timing['forward_ms']} ms ({timing['forward_s']} s in all) |",
        f"| explain, per image (median) | {timing['explain_ms']} ms ({timing['explain_s']} s in all) |",
        f"| flagged instances | {flags['flagged']} ({off_object} {flags['off_object']}, {background} "
        f"{flags['background_fp']}, {elsewhere} {flags['miss_elsewhere']}) |",
        f"| candidate cues | {len(cues)} ({sum(c['confirmed'] for c in cues)} confirmed) |",
        f"| HTML report | {_link(report) if report else 'not written'} |",
        f"| FiftyOne dataset | {f'`{fiftyone_dataset}`: `{open_command(fiftyone_dataset)}`' if fiftyone_dataset else 'not pushed'} |",
        f"| store | {_link(Path(store))} |",
        "",
        *_cue_table(cues),
        f"Query the store with `eive-audit sql --store {Path(store).resolve()} \"SELECT ... WHERE run_id = "
        f"'{run_id}'\"`.",
    ]
    return "\n".join(lines)


def _link(path: Path) -> str:
    """A markdown link to a local file (the Prefect UI renders it; a browser opens file:// links it is allowed to)."""
    resolved = Path(path).resolve()
    return f"[`{resolved}`]({resolved.as_uri()})"


def _cue_table(cues: list[dict[str, Any]]) -> list[str]:
    """The run's CUES_LISTED largest candidate cues, confirmed first, as markdown lines (none without findings)."""
    if not cues:
        return []
    cues = cues[:CUES_LISTED]
    return ["| cue | class | support | verification drop | confirmed |", "|---|---|---|---|---|",
            *(f"| {c['cue_id']} | {c['label_name']} | {c['support']} | {c['drop']} | {c['confirmed']} |" for c in cues),
            ""]


def publish_run_artifacts(store: Path, run_id: str, report: Path | None = None, fiftyone_dataset: str | None = None,
                          diff: dict[str, Any] | None = None, limit: int = WORST_LIMIT) -> dict[str, str]:
    """Create the summary and worst-detections artifacts of a run, and with `diff` (reports.diff) the changes
    since its base run (in the current flow run when called from one); returns their keys as {"summary": key,
    "worst": key} plus "diff"."""
    keys = {"summary": artifact_key("audit", run_id, "summary"), "worst": artifact_key("audit", run_id, "worst")}
    if diff is not None:
        keys["diff"] = artifact_key("audit", run_id, "diff")
        create_markdown_artifact(diff_markdown(diff, store), key=keys["diff"],
                                 description=f"Audit {run_id}: what changed since run {diff['base']}")
    create_markdown_artifact(summary_markdown(store, run_id, report, fiftyone_dataset), key=keys["summary"],
                             description=f"Audit {run_id}: counts, timings and where to review it")
    task = query(store, "SELECT task FROM runs WHERE run_id = ?", [run_id]).column("task")[0].as_py()
    box = "GT box" if task == "detect" else "object box of their class"
    create_table_artifact(worst_detections(store, run_id, limit), key=keys["worst"],
                          description=f"Audit {run_id}: the {limit} {_WORST_WORDS[task]} with the least saliency "
                                      f"mass inside their {box} (mass_in_gt)")
    return keys
