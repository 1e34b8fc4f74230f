"""The process lifecycle of a run: Prefect's ephemeral server starts on a busy machine and beside another
run, dies with the process that started it, and a terminated run exits within seconds.

A busy machine is made deterministic: a fake server (answering /api/health after a set delay, as the real one
does once its migrations are done) stands in for Prefect's uvicorn where a test is about the start; the end
to end test starts the real command twice, at once, on one fresh PREFECT_HOME.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from eive_audit.cli import TERMINATION_GRACE_S
from eive_audit.flows.ephemeral import startup_timeout

CLI = [sys.executable, "-m", "eive_audit"]

# A stand-in for Prefect's uvicorn server: `python -c FAKE_SERVER PORT DELAY` answers 200 on every path,
# /api/health included, DELAY seconds after it starts.
FAKE_SERVER = textwrap.dedent("""
    import http.server, sys, time
    time.sleep(float(sys.argv[2]))
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"true")
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
""")


def _env(home: Path) -> dict[str, str]:
    """A user's environment: ephemeral mode (no PREFECT_API_URL), no start-up limit set, `home` as PREFECT_HOME."""
    unset = ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    return {**{k: v for k, v in os.environ.items() if k not in unset}, "PREFECT_HOME": str(home)}


def _python(script: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_user_set_start_up_limit_stands() -> None:
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 7}):
        assert startup_timeout() == 7


def test_a_flow_run_from_python_waits_for_a_slow_server_start(tmp_path: Path) -> None:
    """Prefect imported first (its settings object is built then, before anything of ours runs) and no limit
    set: the default server must still wait past Prefect's 20 s. Prefect's start counts its budget in
    0.1 s sleeps; the script makes each sleep 100 times shorter, so 20 s of budget pass in well under the
    fake server's 2 s delay while the project's limit (600 s of budget) does not."""
    script = textwrap.dedent(f"""
        import subprocess, sys, time, types
        import prefect  # first, as a user's script may
        import prefect.server.api.server as server_module
        from prefect.server.api.server import SubprocessASGIServer
        import eive_audit.flows  # what `from eive_audit.flows.audit import audit` runs

        SubprocessASGIServer._run_uvicorn_command = lambda self: subprocess.Popen(
            [sys.executable, "-c", {FAKE_SERVER!r}, str(self.port), "2"])
        server_module.time = types.SimpleNamespace(sleep=lambda seconds: time.sleep(seconds / 100))
        server = SubprocessASGIServer()  # the instance Prefect's client starts
        server.start()
        print("healthy")
        server.stop()
    """)
    proc = _python(script, _env(tmp_path / "home"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "healthy" in out, out[-3000:]


def test_two_starts_on_one_home_take_turns(tmp_path: Path) -> None:
    """Two processes start the ephemeral server on one PREFECT_HOME at the same moment (a go-file releases
    both); each fake server takes 1.5 s to answer, as a real one migrating the database does. The second
    server may only be launched once the first answers: then migrations never run side by side."""
    log, go = tmp_path / "events.log", tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        from pathlib import Path
        from prefect.server.api.server import SubprocessASGIServer
        import eive_audit.flows

        log, go = Path(sys.argv[1]), Path(sys.argv[2])
        def launch(self):
            # Every server launched before this one must answer already (its start finished under the lock);
            # checked here, at launch, since a line written after start() returns races the other process.
            import urllib.request
            for line in log.read_text().splitlines() if log.exists() else []:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{{line.split()[1]}}/health", timeout=5)
                except OSError:
                    with log.open("a") as out:
                        out.write(f"overlap {{line.split()[1]}}\\n")
            with log.open("a") as out:
                out.write(f"launch {{self.port}}\\n")
            return subprocess.Popen([sys.executable, "-c", {FAKE_SERVER!r}, str(self.port), "1.5"])
        SubprocessASGIServer._run_uvicorn_command = launch
        Path(sys.argv[3]).touch()  # ready
        while not go.exists():
            time.sleep(0.01)
        server = SubprocessASGIServer()
        server.start()
        time.sleep(2)  # keep this server up while the other one starts, so its launch can check it
        server.stop()
    """)
    env = _env(tmp_path / "home")
    procs = [_python(script, env, str(log), str(go), str(tmp_path / f"ready{i}")) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events == ["launch", "launch"], f"starts overlapped: {events}"


def _descendants(pid: int) -> list[psutil.Process]:
    with suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _wait(what: str, done: Callable[[], bool], timeout: float) -> float:
    """Poll `done` until true; the seconds it took. Fails after `timeout`."""
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < timeout, f"{what} not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


@contextmanager
def _runs(args_of: list[list[str]], env: dict[str, str], logs: list[Path]) -> Iterator[list[subprocess.Popen]]:
    """Start every command at once, each in its own session; on the way out kill whatever is left of them,
    the processes that left their group too."""
    procs = []
    for args, log in zip(args_of, logs):
        with log.open("wb") as out:
            procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    seen: list[psutil.Process] = []
    try:
        yield procs
    finally:
        for proc in procs:
            seen += _descendants(proc.pid)
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for stray in _alive(seen):
            stray.kill()


# slow (`make test-all`): two CLI runs, each with its own server migrating a fresh database, cost 110 s of CI's two
# cores. In the fast suite the start race on one home is test_two_starts_on_one_home_take_turns's, and a killed
# `run` (SIGKILL, then a rerun) is test_audit.py's test_killed_run_resumes_to_the_rows_of_an_uninterrupted_run.
@pytest.mark.slow
def test_two_runs_at_once_on_a_fresh_home_start_and_leave_no_process_when_killed(synth: Path, tmp_path: Path) -> None:
    """Two `run`s started together on one fresh PREFECT_HOME both get going (their servers migrate the new
    database in turn); then SIGTERM to one run's process group ends it within seconds (Prefect alone
    retried its dead server for ~150 s), and kill -9 of the other's CLI process alone, as the OOM killer
    does, takes its server with it. The 40 images listed ten times, in shards of one: long enough to catch both
    mid-run (a run of the 40 alone takes 4 s here, less than the other's server start)."""
    stores = [tmp_path / f"store{i}" for i in range(2)]
    data = json.loads((synth / "annotations" / "val.json").read_text())
    repeated = tmp_path / "val-x10.json"
    repeated.write_text(json.dumps({**data, "images": [{**image, "id": image["id"] + 1000 * copy}
                                                       for copy in range(10) for image in data["images"]],
                                    "annotations": [{**ann, "id": ann["id"] + 100_000 * copy,
                                                     "image_id": ann["image_id"] + 1000 * copy}
                                                    for copy in range(10) for ann in data["annotations"]]}))
    args = [[*CLI, "run", "--coco", str(repeated), "--images", str(synth / "images" / "val"),
             "--model", "default", "--out", str(store), "--shard-size", "1", "--batch-size", "1", "--device", "cpu",
             "--no-findings", "--no-report"] for store in stores]
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    with _runs(args, _env(tmp_path / "home"), logs) as procs:
        def both_going() -> bool:
            for proc, log in zip(procs, logs):
                assert proc.poll() is None, f"a run ended before the test stopped it:\n{log.read_text()[-3000:]}"
            return all(any((store / "_done").glob("*/[!.]*")) for store in stores)

        _wait("a finished shard in both runs", both_going, 400)
        termed, killed = procs
        servers = {proc.pid: [p for p in _descendants(proc.pid) if "uvicorn" in " ".join(p.cmdline())]
                   for proc in procs}
        assert all(len(found) == 1 for found in servers.values()), servers

        os.killpg(termed.pid, signal.SIGTERM)
        _wait("the SIGTERMed run's exit", lambda: termed.poll() is not None, TERMINATION_GRACE_S + 15)
        _wait("its server to stop", lambda: not _alive(servers[termed.pid]), 10)

        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=10)
        _wait("the killed run's server to die", lambda: not _alive(servers[killed.pid]), 10)
