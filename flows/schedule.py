"""Scheduled audits: serve the audit flow as a Prefect deployment with a cron schedule.

A schedule lives on a Prefect server, so this needs the user's server (PREFECT_API_URL); the ephemeral
mode that one-off runs use dies with the process and would fire nothing. The serving process is the
worker too: it polls the server and runs each due audit in a subprocess, one at a time (two runs of one
config would write the same shards). The config travels as a JSON dict of AuditConfig fields with
absolute paths, which Prefect validates back into AuditConfig when a run starts, so a run started from
the UI with edited parameters is checked like a command line.
"""

from __future__ import annotations

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.settings import PREFECT_API_URL
from pydantic import ValidationError

from eive_audit.flows.audit import audit
from eive_audit.pipeline.config import AuditConfig

START_SERVER = "prefect server start --host 127.0.0.1"


class NoServerError(RuntimeError):
    """No Prefect server to serve a deployment against: PREFECT_API_URL unset, or nothing answers there."""


def check_cron(cron: str) -> str:
    """`cron` if Prefect's scheduler accepts it, else ValueError saying what a cron string looks like."""
    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise ValueError(f"bad cron string {cron!r}: give five fields, minute hour day-of-month month day-of-week, "
                         "e.g. \"0 2 * * *\" for 02:00 every day") from None
    return cron


def require_server() -> str:
    """The URL of the Prefect server to serve against, checked to answer its health endpoint."""
    url = PREFECT_API_URL.value()
    if not url:
        raise NoServerError("a schedule needs a running Prefect server and PREFECT_API_URL is not set: start one with "
                            f"`{START_SERVER}`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise NoServerError(f"no Prefect server answers at PREFECT_API_URL={url} ({problem}); start one with "
                            f"`{START_SERVER}`")
    return url


def audit_deployment(config: AuditConfig, cron: str, name: str) -> RunnerDeployment:
    """The audit flow as a deployment named `audit/<name>` that runs `config` on the `cron` schedule; the
    server checks its parameters against AuditConfig's JSON schema, AuditConfig again when a run starts."""
    return audit.to_deployment(
        name=name, cron=check_cron(cron), parameters={"config": config.absolute().model_dump(mode="json")},
        description=f"eive-audit of {config.images} into {config.out} (run id {config.run_id})")


def serve_audit(config: AuditConfig, cron: str, name: str) -> None:
    """Register the scheduled deployment and serve it until interrupted (the schedule pauses on exit).

    The cron string is checked before the server, so a typo is named even where no server runs."""
    deployment = audit_deployment(config, cron, name)
    require_server()
    serve(deployment, limit=1)
