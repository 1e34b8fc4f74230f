"""Prefect flows: audit (with its findings step), train, schedule. Flows plan, submit tasks to the task
runner the config names, and gather; a task glues `pipeline` work to `storage` reads and writes, passing
paths and small configs, never tensors. May import `pipeline`, `explainers`, `storage` and `reports`.
"""
