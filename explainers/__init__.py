"""Explainers: one file per method, one `explain(...)` interface, one registry by name (METHODS.md).

May import `pipeline.models` (the model interface) only. Importing this package registers every method:
`eive` and the baselines `raw-attention`, `rollout`, `chefer`, `odam`, `drise`, `legrad-detr`, `cdam-detr`.
"""

from eive_audit.explainers import cdam_detr, chefer, drise, eive, legrad_detr, odam, raw_attention, rollout
from eive_audit.explainers.base import Explainer, Targets, available, get_explainer, register

__all__ = ["Explainer", "Targets", "available", "get_explainer", "register", "cdam_detr", "chefer", "drise", "eive",
           "legrad_detr", "odam", "raw_attention", "rollout"]
