"""Scheduled audits against a real Prefect server: `eive-audit schedule` registers a cron deployment, a run
of it audits into the store and leaves its artifacts, and every process started here is gone afterwards.
The server is the session's (tests/conftest.py `prefect_api`: Prefect's test harness, a real API server in
a process of its own), so the test pays no second server start.

Processes get SIGTERM, not SIGINT: a shell that starts pytest in the background makes its children ignore
SIGINT, and Prefect's runner stops (pausing its schedule) on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from eive_audit.cli import app
from eive_audit.pipeline.config import AuditConfig
from eive_audit.storage.catalog import query

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "eive_audit"]
T = TypeVar("T")
N_IMAGES = 8  # of the synth val split: what the test claims of a scheduled run does not depend on its size


def _wait_for(what: str, probe: Callable[[], T | None], timeout: float, log: Path | None = None) -> T:
    """Poll `probe` until it returns something other than None (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception:
            value = None
        if value is not None:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log and log.is_file() else ""
    raise TimeoutError(f"{what} not within {timeout} s\n{tail}")


def _group(pgid: int) -> list[psutil.Process]:
    """Every live process of a process group (a started command and whatever it spawned without leaving it)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue
    return members


def _stop(proc: subprocess.Popen, seen: list[psutil.Process]) -> None:
    """Stop a started command's process group (SIGTERM, SIGKILL after 30 s) and any descendant that left the
    group, recording every one of them in `seen`."""
    try:
        strays = set(psutil.Process(proc.pid).children(recursive=True))
    except psutil.NoSuchProcess:
        strays = set()
    members = {*_group(proc.pid), *strays}
    seen.extend(members)
    for signum, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        for stray in strays:
            with suppress(psutil.NoSuchProcess):
                stray.send_signal(signum)
        _, alive = psutil.wait_procs(list(members), timeout=wait)
        if not alive:
            break
    proc.wait(timeout=10)


@contextmanager
def _started(args: list[str], env: dict[str, str], log: Path, seen: list[psutil.Process]) -> Iterator[subprocess.Popen]:
    """Run `args` in a new session (so its group can be stopped whole), output to `log`; stop it on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        _stop(proc, seen)


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    return env | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
                  "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}", **extra}


def test_a_scheduled_audit_runs_on_a_real_server_and_leaves_no_process(synth: Path, synth_val_subset, prefect_api: str,
                                                                        tmp_path: Path) -> None:
    home = tmp_path / "prefect"
    home.mkdir()
    config = AuditConfig(images=synth / "images" / "val", coco=synth_val_subset(N_IMAGES, tmp_path / "val.json"),
                         out=tmp_path / "store", shard_size=1000, device="cpu", review={"report": False})
    yaml_file = config.to_yaml(tmp_path / "nightly.yaml")
    seen: list[psutil.Process] = []
    serve_log = tmp_path / "serve.log"
    # The serving process, stopped on the way out (which pauses its schedule).
    with _started([*CLI, "schedule", "--config", str(yaml_file), "--cron", "0 2 * * *"],
                  _env(home, PREFECT_API_URL=prefect_api, PREFECT_RUNNER_POLL_FREQUENCY="1"), serve_log, seen):
        with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
            deployment = _wait_for("deployment audit/nightly", lambda: client.read_deployment_by_name("audit/nightly"),
                                   90, serve_log)
            assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
            flow_run = client.create_flow_run_from_deployment(deployment.id)
            # The run audits 8 images with findings: seconds alone on 2 cores, but minutes beside the
            # real-size DETR test of the parallel worker, so the wait is generous.
            final = _wait_for("the triggered run to finish", lambda: _final_state(client, flow_run.id), 600, serve_log)
            assert final.is_completed(), f"{final}\n{serve_log.read_text()[-4000:]}"
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    assert not [p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "every started process stopped"

    run_id = config.run_id
    assert query(config.out, "SELECT status FROM runs WHERE run_id = ?", [run_id]).column("status").to_pylist() == ["finished"]
    images = query(config.out, "SELECT count(*) AS n FROM images WHERE run_id = ?", [run_id]).column("n")[0].as_py()
    assert images == N_IMAGES
    assert query(config.out, "SELECT count(*) AS n FROM instances WHERE run_id = ?", [run_id]).column("n")[0].as_py() > 0
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert set(by_key) == {f"audit-{run_id}-summary", f"audit-{run_id}-worst"}
    assert f"# Audit `{run_id}`" in by_key[f"audit-{run_id}-summary"].data
    assert f"| images | {N_IMAGES} |" in by_key[f"audit-{run_id}-summary"].data


def _final_state(client, flow_run_id):
    state = client.read_flow_run(flow_run_id).state
    return state if state is not None and state.is_final() else None


def test_schedule_refuses_without_a_server_and_names_how_to_start_one(tmp_path: Path) -> None:
    yaml_file = tmp_path / "audit.yaml"
    yaml_file.write_text("images: imgs\nout: store\n")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["schedule", "--config", str(yaml_file), "--cron", "0 2 * * *"])
    assert result.exit_code == 2, result.output
    assert "PREFECT_API_URL is not set" in result.output
    assert "prefect server start --host 127.0.0.1" in result.output


def test_schedule_names_a_bad_cron_string(tmp_path: Path) -> None:
    yaml_file = tmp_path / "audit.yaml"
    yaml_file.write_text("images: imgs\nout: store\n")
    result = CliRunner().invoke(app, ["schedule", "--config", str(yaml_file), "--cron", "0 2 * *"])
    assert result.exit_code == 2
    assert "bad cron string '0 2 * *'" in result.output


def test_schedule_fail_on_overrides_the_file_and_reaches_every_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    import eive_audit.flows.schedule as schedule

    served = []
    monkeypatch.setattr(schedule, "serve_audit", lambda config, cron, name: served.append(config))
    yaml_file = tmp_path / "audit.yaml"
    yaml_file.write_text("images: imgs\nout: store\nreview: {fiftyone_dataset: nightly, fail_on: [newly_flagged>5]}\n")
    result = CliRunner().invoke(app, ["schedule", "--config", str(yaml_file), "--cron", "0 2 * * *",
                                      "--fail-on", "new_confirmed_cues>0, recall_drop>=0.1"])
    assert result.exit_code == 0, result.output
    [config] = served
    assert config.review.fail_on == ["new_confirmed_cues>0", "recall_drop>=0.1"]
    assert config.review.fiftyone_dataset == "nightly", "the file's other review settings stay"
    parameters = schedule.audit_deployment(config, "0 2 * * *", "nightly").parameters["config"]
    assert AuditConfig.model_validate(parameters).review.fail_on == config.review.fail_on
