"""Prefect flows: training now; audit and schedule with their issues. Flows orchestrate; tasks pass paths
and small configs, never tensors. May import `pipeline`, `explainers`, `storage` and `reports`.
"""
