"""Prefect flows: audit (with its findings step), train, schedule. Flows orchestrate; tasks pass paths
and small configs, never tensors. May import `pipeline`, `explainers`, `storage` and `reports`.
"""
