"""Explainers: one file per method, one `explain(...)` interface, one registry by name (METHODS.md).

May import `pipeline.models` (the model interface) and `pipeline.config` (their settings) only. Importing
this package loads no method (and so no torch): `get_explainer` imports the one it is asked for. The
built-ins are `eive` and the baselines `raw-attention`, `rollout`, `chefer`, `odam`, `drise`, `legrad-detr`,
`cdam-detr`; `check_supported` says whether a model family can run them.
"""

from eive_audit.explainers.base import (
    BUILTIN,
    Explainer,
    Needs,
    available,
    capabilities,
    check_supported,
    explainer_class,
    get_explainer,
    needs_of,
    register,
)

__all__ = ["BUILTIN", "Explainer", "Needs", "available", "capabilities", "check_supported", "explainer_class", "get_explainer",
           "needs_of", "register"]
