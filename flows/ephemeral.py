"""Prefect's ephemeral API server, started so that no run fails or leaves a process behind because of it.

A flow run without PREFECT_API_URL makes Prefect start a temporary server: `uvicorn` in a subprocess
(`prefect.server.api.server.SubprocessASGIServer`) that migrates the SQLite database under PREFECT_HOME in
its start-up and answers /health only then. Three things go wrong with it as Prefect ships it:

- it gives up after PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (default 20 s), which a busy machine
  overruns; the setting is read from the settings object that `import prefect` builds, so an environment
  variable set after that import does not count;
- two processes that start it at once on one PREFECT_HOME run the database migrations side by side and
  one fails ("Online migration expected to match one row"): Prefect's migration lock is per process;
- the server is a plain child: `kill -9` of the process that started it (the OOM killer) leaves it running.

`EphemeralServer` is that server with the three fixed: an unset limit becomes `STARTUP_TIMEOUT_S` (a limit the
user sets, by variable, profile or prefect.toml, stands); the start, up to the first healthy answer, runs under
an exclusive lock on a file in PREFECT_HOME, so migrations run one process at a time and later starts find the
database current; and the server gets PR_SET_PDEATHSIG (Linux), so the kernel kills it when its parent
dies, however it dies. A lock was chosen over a home per process (every run would migrate a fresh database
from nothing, ~20 s here, and the run history would be scattered) and over sharing one running server
(its lifetime would hang on whichever process started it). Concurrent servers then share the database as
Prefect's own ephemeral processes do (SQLite in WAL mode, with a busy timeout).

Importing this module (`eive_audit.flows` does) makes it the server Prefect's client starts: Prefect keeps
one instance per port in `SubprocessASGIServer._instances`, the default one under None, which is where its
test harness puts its own server too; one already there (a harness, a server already started) is left as
it is.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import os
import queue
import signal
import sys
import threading
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

import prefect.server.api.server as prefect_server
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import get_current_settings

STARTUP_TIMEOUT_S = 600  # when the user sets no limit: a busy machine's start must wait, never fail
LOCK_NAME = "eive-audit-ephemeral-start.lock"  # in PREFECT_HOME, beside the default database
PR_SET_PDEATHSIG = 1  # linux/prctl.h
T = TypeVar("T")


def startup_timeout() -> int:
    """Seconds a start may take: the user's PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS if set anywhere
    Prefect reads settings from, else STARTUP_TIMEOUT_S (Prefect's own default, 20 s, is too short here)."""
    ephemeral = get_current_settings().server.ephemeral
    return ephemeral.startup_timeout_seconds if "startup_timeout_seconds" in ephemeral.model_fields_set \
        else STARTUP_TIMEOUT_S


@contextmanager
def start_lock() -> Iterator[None]:
    """Hold the exclusive lock on PREFECT_HOME's start-up lock file: one ephemeral start (and so one run of
    the database migrations) at a time per home, across processes. flock is released by the kernel when
    its holder dies, so a start killed midway blocks nobody."""
    home = get_current_settings().home
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _LifelongThread:
    """One daemon thread that lives as long as the process and runs the calls handed to it.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not its process; a server forked
    from a short-lived thread (a worker of Prefect's, a user's) would be killed with that thread."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    def call(self, fn: Callable[[], T]) -> T:
        with self._starting:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="eive-audit-spawner", daemon=True)
                self._thread.start()
        done: Future = Future()
        self._calls.put((fn, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            fn, done = self._calls.get()
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the caller, who raises it
                done.set_exception(exc)


_SPAWNER = _LifelongThread()


def _die_with_parent(prctl: Callable[..., int], parent: int) -> None:
    """In the forked child before exec: ask the kernel for SIGKILL when the forking thread ends; a parent
    already gone (killed between fork and here) is seen as a changed parent pid, and the child leaves."""
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


@contextmanager
def _children_die_with_this_process() -> Iterator[None]:
    """Within the block, the subprocesses that Prefect's server module starts get `_die_with_parent`.

    Prefect builds the server's command line and environment inside one private method and starts it with
    `subprocess.Popen`; rather than rewrite that method, the block gives that module a `subprocess` whose
    Popen adds the pre-exec step, and puts the real one back after. Only that module sees it, and only
    `_run_uvicorn_command` uses it."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    popen = functools.partial(prefect_server.subprocess.Popen,
                              preexec_fn=functools.partial(_die_with_parent, prctl, os.getpid()))
    real = prefect_server.subprocess
    prefect_server.subprocess = types.SimpleNamespace(**{**vars(real), "Popen": popen})
    try:
        yield
    finally:
        prefect_server.subprocess = real


class EphemeralServer(SubprocessASGIServer):
    """Prefect's ephemeral server with a start-up limit for a busy machine, one start per home at a time,
    and a server process that dies with its parent (see the module's docstring)."""

    def start(self, timeout: int | None = None) -> None:
        if self.running:  # Prefect's own guard, before the lock: a started server never waits on another's start
            return
        with start_lock():  # another process's start on this home: wait here until its server answers
            super().start(timeout or startup_timeout())

    def _run_uvicorn_command(self) -> Any:
        if not sys.platform.startswith("linux"):
            return super()._run_uvicorn_command()

        def spawn() -> Any:
            with _children_die_with_this_process():
                return super(EphemeralServer, self)._run_uvicorn_command()

        return _SPAWNER.call(spawn)


EphemeralServer()  # the default instance (key None), unless one is there already
