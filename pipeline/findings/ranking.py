"""`spurious_score`: the probability that a detection relies on something other than its object, from all the
findings step knows of it; and the prior that decides whom the forward budget verifies first.

Two logistic models, fitted on four worlds of the planted-cue benchmark suite and scored on each world by the
models fitted on the others (`python benchmarks/spurious_recovery.py --suite --fit`, which prints the
coefficients below and those held-out figures; README "Finding shortcuts" has them, and where it fails). A
logistic model's output is a probability, and its inputs mean the same in every class and run (relative drops,
the margin to the run's own score threshold, the resolution-aware off-object share), so a score of 0.8 means
the same wherever it is read.

- `PRIOR`, before any forward: how close the detection is to the score threshold (a cue typically lifts a weak
  detection over it), how far its map strays off its object, and its outcome.
- `FULL`, once verified: the prior's inputs plus the relative score drop with the surroundings blurred, and,
  once localised, how specific to one place that reliance is. An instance the budget did not verify keeps
  its prior, so every instance has a score on one scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from eive_audit.pipeline.config import OUTCOME_ROLES
from eive_audit.pipeline.findings.flags import InstanceFinding

PRIOR_FEATURES = ("margin", "off_object_norm", "fp", "fn")
FULL_FEATURES = (*PRIOR_FEATURES, "drop", "drop_x_weak", "specificity", "localised")


@dataclass(frozen=True)
class Logistic:
    """p = sigmoid(bias + sum of weight * feature), over named features."""

    weights: Mapping[str, float]
    bias: float

    def __call__(self, features: Mapping[str, float]) -> float:
        z = self.bias + sum(w * features[name] for name, w in self.weights.items())
        return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))


# Fitted by `python benchmarks/spurious_recovery.py --suite --fit --generators
# compact-patch,thin-patch,hollow-far,texture --n-val 300 --models M` (seed 1234): PRIOR on every instance, FULL on
# the instances the default budget verifies, with the localisation it affords.
PRIOR = Logistic({"margin": -1.333, "off_object_norm": 2.782, "fp": 1.487, "fn": -0.442}, bias=-3.599)
FULL = Logistic({"margin": -0.167, "off_object_norm": 2.292, "fp": 0.798, "fn": -0.182, "drop": 3.663,
                 "drop_x_weak": -1.202, "specificity": -0.457, "localised": 0.976}, bias=-5.59)


def margin(score: float, threshold: float) -> float:
    """How far a detection clears the run's score threshold, as a share of the room above it, in [0, 1]."""
    return min(max((score - threshold) / max(1.0 - threshold, 1e-6), 0.0), 1.0)


def features(row: Mapping[str, Any], finding: InstanceFinding, threshold: float) -> dict[str, float]:
    """The named inputs of both models for one instance (its row and finding); a miss's score is its best
    query's, below the threshold, so its margin is 0."""
    drop = 0.0 if finding.verification_drop is None else min(max(finding.verification_drop, 0.0), 1.0)
    specific = 0.0 if finding.specificity is None else min(max(finding.specificity, 0.0), 1.0)
    m = margin(float(row["score"]), threshold)
    role = OUTCOME_ROLES[row["outcome"]]
    return {"margin": m, "off_object_norm": float(finding.off_object_norm), "fp": float(role == "fp"),
            "fn": float(role == "fn"), "drop": drop, "drop_x_weak": drop * (1.0 - m),
            "specificity": specific, "localised": float(finding.specificity is not None)}


def prior_score(row: Mapping[str, Any], finding: InstanceFinding, threshold: float) -> float:
    """The prior probability of reliance, before any forward: what orders verification."""
    return PRIOR(features(row, finding, threshold))


def spurious_scores(cases: Iterable[tuple[Mapping[str, Any], InstanceFinding]], threshold: float) -> None:
    """Fill each finding's `spurious_score`: `FULL` where it was verified, else its prior."""
    for row, finding in cases:
        model = PRIOR if finding.verification_drop is None else FULL
        finding.spurious_score = model(features(row, finding, threshold))
