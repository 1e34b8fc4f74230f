"""A run as the store sees it: its row in `runs` (`running` when it starts, then `finished` or `failed` with
its error), its summary counts read back through the catalog, and where its HTML report goes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from eive_audit.storage.catalog import reader, refresh_catalog
from eive_audit.storage.schema import FLAGGED
from eive_audit.storage.writer import read_table, table_path, write_table

RUN_SHARD = "run"  # the shard name of the one-file-per-run tables (runs, findings)


@dataclass(frozen=True)
class RunInfo:
    """What the runs row says about a run's configuration; fixed for the run's lifetime."""

    run_id: str
    config_hash: str
    config_json: str
    model: str
    explainers: Sequence[str]
    created_at: datetime
    task: str = "detect"


def start_run(root: Path, info: RunInfo) -> None:
    """Write the run's row as `running` when it starts."""
    _write_row(root, info, "running", 0.0, {}, None)


def finish_run(root: Path, info: RunInfo, seconds: float, counts: Mapping[str, int]) -> None:
    """Mark the run `finished` (stamped now) with its totals."""
    _write_row(root, info, "finished", seconds, counts, None)


def fail_run(root: Path, info: RunInfo, seconds: float, error: BaseException) -> None:
    """Mark the run `failed` with its error (an interrupt too); a rerun of the same command resumes it."""
    message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    _write_row(root, info, "failed", seconds, {}, message[:2000])


def _stored_row(root: Path, run_id: str) -> dict[str, Any] | None:
    """The run's row as stored, or None before its first start."""
    if not table_path(root, "runs", run_id, RUN_SHARD).is_file():
        return None
    rows = read_table(root, "runs", run_id, RUN_SHARD).to_pylist()
    return rows[0] if rows else None


def _write_row(root: Path, info: RunInfo, status: str, seconds: float, counts: Mapping[str, int],
               error: str | None) -> None:
    """(Re)write the run's one row, then the catalog; the file is replaced whole, so the runs view never
    shows a run twice.

    A finished row is final: the run id is the config hash, so rerunning a finished run's command reuses its
    row and recomputes nothing, and neither a kill nor a failure during that rerun may turn the finished run
    back into an unfinished one. A resumed run keeps its first start time."""
    previous = _stored_row(root, info.run_id)
    if previous is not None and previous["status"] == "finished":
        return
    write_table(root, "runs", info.run_id, RUN_SHARD, [{
        "config_hash": info.config_hash, "config_json": info.config_json,
        "created_at": previous["created_at"] if previous is not None else info.created_at,
        "finished_at": datetime.now(timezone.utc) if status == "finished" else None, "status": status,
        "model": info.model, "task": info.task, "explainers": ",".join(info.explainers), "seconds": seconds,
        "n_images": counts.get("images", 0), "n_instances": counts.get("instances", 0),
        "n_errors": counts.get("errors", 0), "error": error,
    }])
    refresh_catalog(root, check_versions=False)  # the run checked the store before it started


def run_summary(root: Path, run_id: str) -> dict[str, Any]:
    """Counts of the run read back through DuckDB: images, errors, instances by outcome, instances with
    faithfulness, flagged instances, the instances the findings' forward budget verified and localised (the
    rest it skipped) and candidate cues."""
    with reader(root, ("images", "errors", "instances", "findings")) as read:
        outcomes = read("SELECT outcome, count(*) AS n FROM instances WHERE run_id = ? GROUP BY outcome "
                        "ORDER BY outcome", [run_id])

        def count(table: str, condition: str = "TRUE") -> int:
            return read(f"SELECT count(*) AS n FROM {table} WHERE run_id = ? AND {condition}",
                        [run_id]).column("n")[0].as_py()

        return {"run_id": run_id, "images": count("images"), "audited": count("images", "status = 'ok'"),
                "errors": count("errors"),
                "instances": dict(zip(outcomes.column("outcome").to_pylist(), outcomes.column("n").to_pylist())),
                "with_faithfulness": count("instances", "insertion_auc IS NOT NULL"),
                "flagged": count("instances", FLAGGED),
                "verified": count("instances", "verification_drop IS NOT NULL"),
                "localised": count("instances", "specificity IS NOT NULL"),
                "candidate_cues": count("findings")}


def summary_counts(summary: Mapping[str, Any]) -> dict[str, int]:
    """The totals of a `run_summary` that the runs row keeps."""
    return {"images": summary["images"], "instances": sum(summary["instances"].values()), "errors": summary["errors"]}


def report_path(root: Path, run_id: str) -> Path:
    """Where a run's HTML report goes by default: beside its tables, named by the run."""
    return Path(root) / "reports" / f"{run_id}.html"
