"""Findings: which predictions lean on something other than their object, and the shared cue behind them.

Run at the end of every audit, from the run's stored rows and maps (nothing here reads dataset-specific
annotations beyond the GT boxes of the instances table), one module per step:

1. `flags`: per instance, the share of its map that lies off its object (`off_object_share`): off the
   matched GT box for a correct detection, duplicate or miss; off every GT box of the image for a false
   positive (its map sits on background); off its own box where there is no GT. Flags mark correct detections
   looking off-object, false positives driven by background and misses whose best query looked elsewhere.
   They are computed when each shard is audited (`pipeline.audit`) and read back here; this step adds the
   off-object peak.
2. `clustering`: per class, each flagged instance's off-object saliency peak is described (the detector's
   own projected backbone feature at the peak, the peak's position relative to the box, the colour of the
   image there) and the descriptions are clustered (scikit-learn HDBSCAN). A cluster that many instances share is a
   candidate cue.
3. `verification`, budgeted: the instance's surroundings (a ring around its box, plus its off-object peak)
   are blurred and the detection re-scored; the relative drop of its score is stored, and a large drop
   confirms reliance on something outside the object.
4. Localisation of confirmed reliance (`verification`), budgeted: a window of 2 x 2 cells slides over those
   surroundings, each position blurred on its own; the window whose blur hurts most becomes the instance's peak; its
   drop, and how far it exceeds the median window's drop (`specificity`), are stored. Attention alone may
   miss a cue right beside the object (the backbone's receptive field folds it into the object's own
   tokens), so this is what puts the peak, and the clusters, on it.

`spurious_score` ranks instances for review: reliance on the surroundings times how specific to one place
it is (see `spurious_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from eive_audit.pipeline.config import FindingsConfig
from eive_audit.pipeline.findings.clustering import cluster_cues, describe_peaks
from eive_audit.pipeline.findings.flags import Case, InstanceFinding, InstanceKey, describe_instance, row_box
from eive_audit.pipeline.findings.verification import localise, verify, within_budget
from eive_audit.pipeline.geometry import Geometry
from eive_audit.pipeline.models.detr import DetrAdapter

__all__ = ["Findings", "InstanceFinding", "InstanceKey", "find_spurious", "spurious_scores"]


@dataclass
class Findings:
    """The result: per-instance updates keyed by (instance_id, explainer), and one row per candidate cue."""

    instances: dict[InstanceKey, InstanceFinding] = field(default_factory=dict)
    cues: list[dict[str, Any]] = field(default_factory=list)


def spurious_scores(findings: Iterable[InstanceFinding]) -> None:
    """Fill `spurious_score` in [0, 1]: the verified drop with the surroundings blurred times the specificity
    of that reliance. A shortcut is one place: blurring the window on it costs the score, blurring the
    others does not. A detection that is merely fragile loses its score wherever one blurs (a high median
    window drop), and one that uses its context as a whole loses it only to the full ring; neither is a
    shortcut. Where a case was not localised, its off-object share stands in for the specificity (attention
    leaving the object hints at one place), and where it was not verified either, for the drop too."""
    for f in findings:
        drop = f.off_object_share if f.verification_drop is None else min(max(f.verification_drop, 0.0), 1.0)
        specific = f.off_object_share if f.specificity is None else min(max(f.specificity, 0.0), 1.0)
        f.spurious_score = drop * specific


def _cases(rows: list[dict[str, Any]], maps: dict[InstanceKey, np.ndarray], images: dict[int, dict[str, Any]],
           model_labels: dict[InstanceKey, int]) -> dict[InstanceKey, Case]:
    """Every row as a case: its stored flags, geometry, object cells and off-object peak. The GT objects of an
    image are the distinct GT boxes its rows carry."""
    gt_boxes: dict[int, set[tuple[float, ...]]] = {}
    for row in rows:
        if (box := row_box(row, "gt")) is not None:
            gt_boxes.setdefault(row["image_id"], set()).add(tuple(box))
    cases = {}
    for row in rows:
        key = InstanceKey(row["instance_id"], row["explainer"])
        saliency = maps[key]
        geometry = Geometry.from_image_row(images[row["image_id"]], saliency.shape)
        boxes = torch.tensor(sorted(gt_boxes.get(row["image_id"], ())), dtype=torch.float32).reshape(-1, 4)
        cases[key] = describe_instance(row, saliency, boxes, geometry, model_labels[key])
    return cases


def find_spurious(adapter: DetrAdapter, rows: list[dict[str, Any]], maps: dict[tuple[str, str], np.ndarray],
                  images: dict[int, dict[str, Any]], model_labels: dict[tuple[str, str], int],
                  config: FindingsConfig, batch_size: int) -> Findings:
    """Findings of one run: rows of its instances table (with the flags its shards were written with), their
    maps by (instance_id, explainer), its images rows by image id (file_path and the stored sizes) and the
    model label index of each instance; forwards take `batch_size` images (the audit's)."""
    cases = _cases(rows, maps, images, model_labels)  # type: ignore[arg-type]
    order = sorted(cases, key=lambda k: (not cases[k].finding.flagged, -cases[k].finding.off_object_share, k))
    verify(adapter, [cases[k] for k in order[:config.verify_budget]], images, config, batch_size)
    confirmed = sorted((k for k in order[:config.verify_budget]
                        if cases[k].finding.verification_drop >= config.confirm_drop),  # type: ignore[operator]
                       key=lambda k: (-cases[k].finding.verification_drop, k))  # type: ignore[operator]
    localise(adapter, within_budget([cases[k] for k in confirmed], config), images, config, batch_size)
    described = [case for case in cases.values()
                 if case.finding.peak is not None and (case.finding.flagged or case.finding.localised_drop is not None)]
    peaks = describe_peaks(adapter, described, images, batch_size)
    cues = cluster_cues(peaks, config)
    findings = Findings(instances={key: case.finding for key, case in cases.items()})
    spurious_scores(findings.instances.values())
    findings.cues = [cue.row(config) for cue in cues]
    return findings
