"""A training run killed mid-way, for the resume tests of every trainer: an `on_step` callback that raises."""

from __future__ import annotations

from typing import Callable


class Interrupted(Exception):
    """Raised by `crash_at`'s callback: not an error any trainer catches, so it stops the run as a kill would."""


def crash_at(step: int) -> Callable[[int, dict[str, float]], None]:
    """An `on_step(step, losses)` callback that stops the run when it reaches `step` (after that step's
    checkpoint, if one falls there)."""
    def on_step(current: int, _losses: dict[str, float]) -> None:
        if current == step:
            raise Interrupted
    return on_step
