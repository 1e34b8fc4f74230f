"""Progress of a run's long steps, reported by the code doing them and shown by whoever listens.

Library code wraps a long loop in `step(name, total)` and calls the `advance(n)` it yields; it never draws.
The command line listens (`listening(listener)`: rich bars on a terminal, one line per step elsewhere);
without a listener, in a Dask or Ray worker process or a user's own Python, a step costs nothing. The
listener is process-wide rather than context-local because Prefect runs tasks on its own threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

Advance = Callable[[int], None]
Listener = Callable[[str, "int | None"], AbstractContextManager[Advance]]

_listener: Listener | None = None


def _ignore(n: int = 1) -> None:
    """The advance of a step nobody listens to."""


@contextmanager
def step(name: str, total: int | None) -> Iterator[Advance]:
    """A long step of `total` units (None: unknown); yields `advance(n=1)`."""
    listener = _listener
    with listener(name, total) if listener is not None else nullcontext(_ignore) as advance:
        yield advance


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every step started in this process while the block runs to `listener(name, total)`, a context
    manager yielding the step's advance."""
    global _listener
    previous, _listener = _listener, listener
    try:
        yield
    finally:
        _listener = previous
