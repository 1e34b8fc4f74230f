"""A run as the store sees it: its row in `runs` (written when it starts and again when it ends), its
summary counts read back through the catalog, and where its HTML report goes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from eive_audit.storage.catalog import query
from eive_audit.storage.schema import FLAGGED
from eive_audit.storage.writer import write_table

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


def write_run_row(root: Path, info: RunInfo, status: str, seconds: float, counts: Mapping[str, int]) -> Path:
    """(Re)write the run's one row: `running` at the start, `finished` (stamped now) with its totals at the end.
    The file is replaced whole, so the runs view never shows a run twice."""
    return write_table(root, "runs", info.run_id, RUN_SHARD, [{
        "config_hash": info.config_hash, "config_json": info.config_json, "created_at": info.created_at,
        "finished_at": datetime.now(timezone.utc) if status == "finished" else None, "status": status,
        "model": info.model, "explainers": ",".join(info.explainers), "seconds": seconds,
        "n_images": counts.get("images", 0), "n_instances": counts.get("instances", 0),
        "n_errors": counts.get("errors", 0),
    }])


def run_summary(root: Path, run_id: str) -> dict[str, Any]:
    """Counts of the run read back through DuckDB: images, errors, instances by outcome, instances with
    faithfulness, flagged instances and candidate cues."""
    outcomes = query(root, "SELECT outcome, count(*) AS n FROM instances WHERE run_id = ? GROUP BY outcome "
                           "ORDER BY outcome", [run_id])

    def count(table: str, condition: str = "TRUE") -> int:
        return query(root, f"SELECT count(*) AS n FROM {table} WHERE run_id = ? AND {condition}",
                     [run_id]).column("n")[0].as_py()

    return {"run_id": run_id, "images": count("images"), "errors": count("errors"),
            "instances": dict(zip(outcomes.column("outcome").to_pylist(), outcomes.column("n").to_pylist())),
            "with_faithfulness": count("instances", "insertion_auc IS NOT NULL"),
            "flagged": count("instances", FLAGGED),
            "candidate_cues": count("findings")}


def summary_counts(summary: Mapping[str, Any]) -> dict[str, int]:
    """The totals of a `run_summary` that the runs row keeps."""
    return {"images": summary["images"], "instances": sum(summary["instances"].values()), "errors": summary["errors"]}


def report_path(root: Path, run_id: str) -> Path:
    """Where a run's HTML report goes by default: beside its tables, named by the run."""
    return Path(root) / "reports" / f"{run_id}.html"
