"""Prefect flows: audit (with its findings step), train, schedule. Flows plan, submit tasks to the task
runner the config names, and gather; a task glues `pipeline` work to `storage` reads and writes, passing
paths and small configs, never tensors. May import `pipeline`, `explainers`, `storage` and `reports`.
"""

from prefect.settings import get_current_settings

# Prefect starts its ephemeral server as flows.ephemeral says (a start-up limit for a busy machine, one start
# per PREFECT_HOME at a time, a server that dies with its parent) once that module is imported: here, so that
# every flow of this package, run from the CLI or from Python, gets it. A process given PREFECT_API_URL (a
# user's server, a Dask or Ray worker of a run) never starts one, and is spared importing Prefect's server
# (seconds of every command's start).
if not get_current_settings().api.url:
    from eive_audit.flows import ephemeral  # noqa: F401
