"""Findings: which predictions lean on something other than their object, and the shared cue behind them.

Run at the end of every audit, from the run's stored rows and maps (nothing here reads dataset-specific
annotations beyond the GT boxes of the instances table), one module per step:

1. `flags`: per instance, the share of its map that lies off its object, raw (`off_object_share`) and
   resolution-aware (`off_object_norm`: off the cells the object reaches at the attention grid): off the
   matched GT box for a correct detection, duplicate or miss; off every GT box of the image for a false
   positive (its map sits on background); off its own box where there is no GT. Flags, read from the
   normalised share, mark correct detections looking off-object, false positives driven by background and
   misses whose best query looked elsewhere. They are computed when each shard is audited
   (`pipeline.audit`) and read back here; this step adds the off-object peak.
2. `ranking`, before any forward: each instance's prior probability of reliance (its margin to the score
   threshold, its normalised share, its outcome) orders what the forward budget reaches when it cannot
   verify every image.
3. `verification`, budgeted: the surroundings of every instance of an image (a ring around each box, plus
   each off-object peak, the boxes themselves kept) are blurred at once and each detection re-scored, one
   forward per image; the relative drop of each score is stored, and a large drop confirms reliance on
   something outside the objects.
4. Localisation of confirmed reliance (`verification`), with what is left of the budget, coarse to fine:
   tiles of 4 x 4 cells of those surroundings are blurred one at a time, then each 2 x 2 window inside the
   tile that hurt most; the window whose blur hurts most becomes the instance's peak; its drop, and how far
   it exceeds the median tile's drop (`specificity`), are stored. Attention alone may miss a cue right beside
   the object (the backbone's receptive field folds it into the object's own tokens), so this is what puts
   the peak, and the clusters, on it.
5. `clustering`: per class, the off-object peaks of the verified instances that are flagged or localised are
   described (the detector's own projected backbone feature at the peak, the peak's position relative to
   the box, the colour of the image there) and clustered (scikit-learn HDBSCAN). A cluster that many
   instances share is a candidate cue.

`spurious_score` (`ranking`) is the probability of reliance from everything known of an instance: the prior's
inputs, the verified drop and its specificity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eive_audit.pipeline.config import FindingsConfig
from eive_audit.pipeline.findings.clustering import cluster_cues, describe_peaks
from eive_audit.pipeline.findings.flags import Case, InstanceFinding, InstanceKey, describe_instance, row_box
from eive_audit.pipeline.findings.ranking import prior_score, spurious_scores
from eive_audit.pipeline.findings.verification import localisation_cost, localise, verify
from eive_audit.pipeline.geometry import Geometry
from eive_audit.pipeline.models.detr import DetrAdapter

__all__ = ["Budget", "Findings", "InstanceFinding", "InstanceKey", "find_spurious"]


@dataclass
class Findings:
    """The result: per-instance updates keyed by (instance_id, explainer), one row per candidate cue, and what
    the forward budget covered."""

    instances: dict[InstanceKey, InstanceFinding] = field(default_factory=dict)
    cues: list[dict[str, Any]] = field(default_factory=list)
    budget: "Budget | None" = None


@dataclass
class Budget:
    """Perturbed forwards the findings step may still spend (one per re-scored image), and where they went."""

    left: int
    verified: int = 0
    localised: int = 0

    @classmethod
    def of_run(cls, config: FindingsConfig, audited_images: int) -> "Budget":
        return cls(int(round(config.forward_budget * audited_images)))

    def take(self, forwards: int) -> bool:
        """Spend `forwards` if they fit in what is left."""
        if forwards > self.left:
            return False
        self.left -= forwards
        return True


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
                  config: FindingsConfig, batch_size: int, score_threshold: float) -> Findings:
    """Findings of one run: rows of its instances table (with the flags its shards were written with), their
    maps by (instance_id, explainer), its audited images rows by image id (file_path and the stored sizes),
    the model label index of each instance and the run's score threshold; forwards take `batch_size` images
    (the audit's). Verification (one forward per image) takes the images of the most suspicious instances
    first (`ranking.prior_score`), localisation the largest confirmed drops next, while
    `config.forward_budget` lasts."""
    cases = _cases(rows, maps, images, model_labels)  # type: ignore[arg-type]
    prior = {k: prior_score(case.row, case.finding, score_threshold) for k, case in cases.items()}
    budget = Budget.of_run(config, len(images))
    suspicion: dict[int, float] = {}  # an image is as suspicious as its most suspicious instance
    for key, case in cases.items():
        suspicion[case.row["image_id"]] = max(suspicion.get(case.row["image_id"], 0.0), prior[key])
    verified_images = set(sorted(suspicion, key=lambda i: (-suspicion[i], i))[:budget.left])
    budget.take(len(verified_images))
    chosen = sorted(k for k, case in cases.items() if case.row["image_id"] in verified_images)
    budget.verified = len(chosen)
    verify(adapter, [cases[k] for k in chosen], images, config, batch_size)
    confirmed = sorted((k for k in chosen if cases[k].finding.verification_drop >= config.confirm_drop),  # type: ignore[operator]
                       key=lambda k: (-cases[k].finding.verification_drop, k))  # type: ignore[operator]
    to_localise = [cases[k] for k in confirmed if budget.take(localisation_cost(cases[k], config))]
    budget.localised = len(to_localise)
    localise(adapter, to_localise, images, config, batch_size)
    described = [cases[k] for k in chosen if cases[k].finding.peak is not None
                 and (cases[k].finding.flagged or cases[k].finding.localised_drop is not None)]
    peaks = describe_peaks(adapter, described, images, batch_size)
    spurious_scores(((case.row, case.finding) for case in cases.values()), score_threshold)
    cues = cluster_cues(peaks, config)
    return Findings(instances={key: case.finding for key, case in cases.items()},
                    cues=[cue.row(config) for cue in cues], budget=budget)
