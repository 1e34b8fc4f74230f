"""The `eive-audit` command run in the test process: typer's CliRunner over `eive_audit.cli.app`.

A fresh interpreter per command costs a torch import and a Prefect server start; in-process, every command
shares the loaded libraries, the cached models and the session's one Prefect test harness (conftest.py).
The few true end-to-end runs (the demo, a killed `run`, the scheduled audit) still start `CLI` as a user does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

from typer.testing import CliRunner

from eive_audit.cli import app

CLI = [sys.executable, "-m", "eive_audit"]


class Result(NamedTuple):
    """What a command left: its exit code, stdout, and stderr with whitespace collapsed (so console wrapping
    cannot split a phrase)."""

    code: int
    stdout: str
    stderr: str


def invoke(*args: str | Path) -> Result:
    """`eive-audit ARGS` in this process. An exception other than the command's own exit is raised, not
    turned into an exit code, so a failing test shows its traceback."""
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, " ".join(result.stderr.split()))


def invoke_ok(*args: str | Path) -> str:
    """`eive-audit ARGS`, which must exit 0; its stdout."""
    result = invoke(*args)
    assert result.code == 0, result.stderr[-4000:]
    return result.stdout


def run_ok(*args: str | Path) -> dict:
    """`eive-audit run ARGS`, which must exit 0; its summary (the last stdout line, JSON)."""
    return json.loads(invoke_ok("run", *args).strip().splitlines()[-1])
