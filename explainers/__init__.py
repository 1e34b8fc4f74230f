"""Explainers: one file per method, one `explain(...)` interface, one registry by name (METHODS.md).

May import `pipeline.models` (the model interface) only. EIVE and the baselines arrive with their issues.
"""
