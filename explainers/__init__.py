"""Explainers: one file per method, one `explain(...)` interface, one registry by name (METHODS.md).

May import `pipeline.models` (the model interface) only. Importing this package registers every method.
"""

from explainers import eive
from explainers.base import Explainer, Targets, available, get_explainer, register

__all__ = ["Explainer", "Targets", "available", "get_explainer", "register", "eive"]
