"""What changed between two runs of a store: the instances newly flagged or no longer flagged, the candidate
cues that appeared, grew, shrank or vanished, and each class's shift in localisation, faithfulness and
detection quality. A scheduled audit compares each run with the previous run of its dataset, publishes the
diff, and can fail its flow run on a condition over the diff's `summary` (`review.fail_on`).

Runs never share instance ids that mean the same thing (a query index depends on the model and the image
set), so instances are matched by what they are: the same image file, explainer and class, and boxes that
overlap (IoU >= MATCH_IOU, one to one, by scipy's assignment). The object box is the prediction's, or a
miss's GT box. Cues are matched by the part of their descriptor that is comparable across runs: the peak's
offset from the box (in box sizes) and the colour mean and spread under it; the backbone feature part is
projected by each run's own PCA and is not. Two cues of one (explainer, class) match, one to one, when those
8 numbers lie within MATCH_DISTANCE.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from eive_audit.pipeline.config import parse_condition, sql_outcome_in
from eive_audit.storage.catalog import query
from eive_audit.storage.schema import FLAGGED

MATCH_IOU = 0.5
MATCH_DISTANCE = 0.5  # box sizes and [0, 1] colour units: a cue moves a few tenths between runs, two cues more
LISTED = 50  # instances listed per direction in the JSON and the report; the summary counts all

_OPERATORS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
              "!=": operator.ne}

_INSTANCES_SQL = f"""
SELECT i.instance_id, i.explainer, i.label_name, i.outcome, i.flag_reason, g.file_path, {FLAGGED} AS flagged
FROM instances i JOIN images g ON g.run_id = i.run_id AND g.image_id = i.image_id
WHERE i.run_id = ? ORDER BY i.instance_id, i.explainer
"""

# Pairs of one image file, explainer and class overlapping by MATCH_IOU or more, the base run's and the run's,
# IoU of their object boxes (the GT box of a miss) computed where the rows are: no torch to start for a diff.
_OVERLAPS_SQL = """
WITH objects AS (
    SELECT i.run_id, i.instance_id, i.explainer, i.label_name, g.file_path,
           if(i.outcome = 'fn', i.gt_x0, i.pred_x0) AS x0, if(i.outcome = 'fn', i.gt_y0, i.pred_y0) AS y0,
           if(i.outcome = 'fn', i.gt_x1, i.pred_x1) AS x1, if(i.outcome = 'fn', i.gt_y1, i.pred_y1) AS y1
    FROM instances i JOIN images g ON g.run_id = i.run_id AND g.image_id = i.image_id
), pairs AS (
    SELECT b.instance_id AS base_id, r.instance_id AS run_id, b.explainer, b.file_path,
           greatest(least(b.x1, r.x1) - greatest(b.x0, r.x0), 0) * greatest(least(b.y1, r.y1) - greatest(b.y0, r.y0), 0)
               AS inter, (b.x1 - b.x0) * (b.y1 - b.y0) + (r.x1 - r.x0) * (r.y1 - r.y0) AS areas
    FROM objects b JOIN objects r USING (file_path, explainer, label_name)
    WHERE b.run_id = ? AND r.run_id = ?
)
SELECT base_id, run_id, explainer, file_path, inter / (areas - inter) AS iou FROM pairs
WHERE inter > 0 AND inter / (areas - inter) >= ?
"""

# A classifier's outcomes count as the detection outcomes they play (pipeline.config.OUTCOME_ROLES).
_CLASSES_SQL = f"""
SELECT explainer, label_name,
       avg(mass_in_gt) FILTER ({sql_outcome_in("tp")}) AS mass_in_gt, avg(insertion_auc) AS insertion_auc,
       count(*) FILTER ({sql_outcome_in("tp")}) AS tp, count(*) FILTER ({sql_outcome_in("fp", "dup")}) AS fp,
       count(*) FILTER ({sql_outcome_in("fn")}) AS fn
FROM instances WHERE run_id = ? GROUP BY ALL ORDER BY explainer, label_name
"""

_CUES_SQL = """
SELECT cue_id, explainer, label_name, support, confirmed, verification_drop, offset_x, offset_y, colour_mean,
       colour_std FROM findings WHERE run_id = ? ORDER BY cue_id
"""


class ThresholdBreached(RuntimeError):
    """A finished run whose diff meets a `fail_on` condition; carries the run's summary for the caller."""

    def __init__(self, summary: dict[str, Any], breached: list[str]) -> None:
        diff = summary["diff"]
        super().__init__(f"fail-on: {', '.join(breached)} against base run {diff['base']} "
                         f"({', '.join(f'{k} = {v}' for k, v in diff['summary'].items() if v)})")
        self.summary = summary
        self.breached = breached


def previous_run(store: Path, run_id: str) -> str | None:
    """The latest finished run of the same dataset (image root and annotation file) that finished before
    `run_id` did; None when there is none."""
    runs = query(store, "SELECT run_id, config_json, finished_at FROM runs WHERE status = 'finished' "
                        "ORDER BY finished_at DESC, run_id").to_pylist()
    mine = next((r for r in runs if r["run_id"] == run_id), None)
    if mine is None:
        raise KeyError(f"no finished run {run_id!r} in the store at {store}")
    dataset = _dataset(mine["config_json"])
    return next((r["run_id"] for r in runs if r["run_id"] != run_id and r["finished_at"] <= mine["finished_at"]
                 and _dataset(r["config_json"]) == dataset), None)


def _dataset(config_json: str) -> tuple[str, str | None, str | None]:
    """What names a run's dataset: its image root and annotation file (COCO json or classification index)."""
    config = json.loads(config_json)
    return (str(Path(config["images"]).resolve()),
            *(str(Path(config[name]).resolve()) if config.get(name) else None for name in ("coco", "index")))


def run_diff(store: Path, base: str, run: str) -> dict[str, Any]:
    """The diff of `run` against `base` (see the module docstring); `summary` holds the measures of
    `pipeline.config.DIFF_METRICS`, which `fail_on` conditions name."""
    overlaps = query(store, _OVERLAPS_SQL, [base, run, MATCH_IOU]).to_pylist()
    newly, gone = _flag_changes(_instances(store, base), _instances(store, run), _pairs(overlaps))
    cues = _cue_changes(query(store, _CUES_SQL, [base]).to_pylist(), query(store, _CUES_SQL, [run]).to_pylist())
    classes = _class_shifts(query(store, _CLASSES_SQL, [base]).to_pylist(),
                            query(store, _CLASSES_SQL, [run]).to_pylist())
    summary = {"newly_flagged": len(newly), "no_longer_flagged": len(gone), "new_cues": len(cues["appeared"]),
               "new_confirmed_cues": sum(c["confirmed"] and not (c["base"] or {}).get("confirmed")
                                         for change in ("appeared", "grew", "shrank", "kept") for c in cues[change]),
               "grown_cues": len(cues["grew"]), "vanished_cues": len(cues["vanished"]),
               **{f"{metric}_drop": max([_drop(c, metric) for c in classes] or [0.0])
                  for metric in ("mass_in_gt", "insertion_auc", "precision", "recall")}}
    return {"base": base, "run": run, "summary": summary, "newly_flagged": newly[:LISTED],
            "no_longer_flagged": gone[:LISTED], "cues": {k: v for k, v in cues.items() if k != "kept"},
            "classes": classes}


def breached(diff: dict[str, Any], conditions: Sequence[str]) -> list[str]:
    """The `fail_on` conditions that hold for the diff's summary."""
    held = []
    for condition in conditions:
        metric, op, threshold = parse_condition(condition)
        if _OPERATORS[op](diff["summary"][metric], threshold):
            held.append(condition)
    return held


Key = tuple[str, str]  # (instance_id, explainer)


def _instances(store: Path, run_id: str) -> dict[Key, dict[str, Any]]:
    return {(row["instance_id"], row["explainer"]): row for row in query(store, _INSTANCES_SQL, [run_id]).to_pylist()}


def _pairs(overlaps: list[dict[str, Any]]) -> dict[Key, Key]:
    """Base instance -> run instance, one to one with the most overlap in all (scipy's assignment) within
    each image and explainer, from the overlapping candidates."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for overlap in overlaps:
        groups.setdefault((overlap["explainer"], overlap["file_path"]), []).append(overlap)
    pairs = {}
    for (explainer, _), mine in sorted(groups.items()):
        base_ids = sorted({o["base_id"] for o in mine})
        run_ids = sorted({o["run_id"] for o in mine})
        iou = np.zeros((len(base_ids), len(run_ids)))
        for o in mine:
            iou[base_ids.index(o["base_id"]), run_ids.index(o["run_id"])] = o["iou"]
        for b, r in zip(*linear_sum_assignment(iou, maximize=True)):
            if iou[b, r] > 0:
                pairs[(base_ids[b], explainer)] = (run_ids[r], explainer)
    return pairs


def _flag_changes(base: dict[Key, dict[str, Any]], run: dict[Key, dict[str, Any]], pairs: dict[Key, Key]
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(newly flagged, no longer flagged): matched pairs whose flag changed, and flagged instances that have
    no counterpart in the other run."""
    counterpart = {r: b for b, r in pairs.items()}
    newly = [_listed(row, base.get(counterpart.get(key))) for key, row in run.items()
             if row["flagged"] and not (key in counterpart and base[counterpart[key]]["flagged"])]
    gone = [_listed(row, run.get(pairs.get(key))) for key, row in base.items()
            if row["flagged"] and not (key in pairs and run[pairs[key]]["flagged"])]
    return newly, gone


def _listed(row: dict[str, Any], other: dict[str, Any] | None) -> dict[str, Any]:
    """An instance as the diff lists it, with its counterpart's id in the other run (None: it has none)."""
    return {"instance_id": row["instance_id"], "other_instance_id": other["instance_id"] if other else None,
            "file": Path(row["file_path"] or "").name, "explainer": row["explainer"], "label_name": row["label_name"],
            "outcome": row["outcome"], "flag_reason": row["flag_reason"]}


def _cue_changes(base: list[dict[str, Any]], run: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Cues of `run` that appeared, grew, shrank or kept their support (each with its `base` match), and the
    base cues that vanished."""
    changes: dict[str, list[dict[str, Any]]] = {"appeared": [], "grew": [], "shrank": [], "kept": [], "vanished": []}
    for key in sorted({(c["explainer"], c["label_name"]) for c in base + run}):
        theirs = [c for c in base if (c["explainer"], c["label_name"]) == key]
        mine = [c for c in run if (c["explainer"], c["label_name"]) == key]
        pairs = _match_cues(theirs, mine)
        for b, r in pairs:
            change = "grew" if mine[r]["support"] > theirs[b]["support"] else (
                "shrank" if mine[r]["support"] < theirs[b]["support"] else "kept")
            changes[change].append(_cue(mine[r], theirs[b]))
        changes["appeared"] += [_cue(c, None) for i, c in enumerate(mine) if i not in {r for _, r in pairs}]
        changes["vanished"] += [_cue(c, None) for i, c in enumerate(theirs) if i not in {b for b, _ in pairs}]
    return changes


def _match_cues(base: list[dict[str, Any]], run: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """One-to-one (base index, run index) pairs of cues whose comparable descriptors lie within MATCH_DISTANCE."""
    if not base or not run:
        return []
    a, b = np.array([_descriptor(c) for c in base]), np.array([_descriptor(c) for c in run])
    distance = np.linalg.norm(a[:, None] - b[None], axis=-1)
    rows, cols = linear_sum_assignment(distance)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if distance[i, j] <= MATCH_DISTANCE]


def _descriptor(cue: dict[str, Any]) -> list[float]:
    return [cue["offset_x"], cue["offset_y"], *cue["colour_mean"], *cue["colour_std"]]


def _cue(cue: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    mine = {k: cue[k] for k in ("cue_id", "explainer", "label_name", "support", "confirmed", "verification_drop")}
    return mine | {"base": None if base is None else {k: base[k] for k in ("cue_id", "support", "confirmed")}}


def _class_shifts(base: list[dict[str, Any]], run: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (explainer, class) in both runs: each measure in the base run, in the run, and the shift."""
    theirs = {(c["explainer"], c["label_name"]): _measures(c) for c in base}
    shifts = []
    for row in run:
        key = (row["explainer"], row["label_name"])
        if key in theirs:
            mine = _measures(row)
            shifts.append({"explainer": key[0], "label_name": key[1], **{
                name: {"base": theirs[key][name], "run": value,
                       "shift": None if value is None or theirs[key][name] is None else value - theirs[key][name]}
                for name, value in mine.items()}})
    return shifts


def _measures(row: dict[str, Any]) -> dict[str, float | None]:
    """A class's mean mass_in_gt (correct detections), mean insertion AUC, precision and recall."""
    tp, fp, fn = row["tp"], row["fp"], row["fn"]
    return {"mass_in_gt": row["mass_in_gt"], "insertion_auc": row["insertion_auc"],
            "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None}


def _drop(shift: dict[str, Any], measure: str) -> float:
    """How far `measure` fell for a class (0 when it rose or is unknown)."""
    change = shift[measure]["shift"]
    return max(0.0, -change) if change is not None else 0.0


def diff_markdown(diff: dict[str, Any], store: Path) -> str:
    """The diff as markdown for a Prefect artifact: the summary, then what appeared and what vanished."""
    lines = [f"# Changes in run `{diff['run']}` since run `{diff['base']}`", "", "| measure | value |", "|---|---|",
             *(f"| {name} | {_number(value)} |" for name, value in diff["summary"].items()), ""]
    for title, key in (("Cues that appeared", "appeared"), ("Cues that grew", "grew"), ("Cues that vanished", "vanished")):
        if diff["cues"][key]:
            lines += [f"## {title}", "", "| cue | class | support | confirmed |", "|---|---|---|---|",
                      *(f"| {c['cue_id']} | {c['label_name']} | {support_change(c)} | {c['confirmed']} |"
                        for c in diff["cues"][key]), ""]
    lines.append(f"All of it: `{diff_command(store, diff)}`")
    return "\n".join(lines)


def diff_command(store: Path, diff: dict[str, Any]) -> str:
    """The command that prints this diff whole."""
    return f"eive-audit diff --store {Path(store).resolve()} --base {diff['base']} --run {diff['run']}"


def support_change(cue: dict[str, Any]) -> str:
    """A cue's support, with its base run's before it when it has a match there."""
    return f"{cue['base']['support']} → {cue['support']}" if cue.get("base") else str(cue["support"])


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
