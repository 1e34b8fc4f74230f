"""Prefect flows that train a model (a detector, or a classifier with task classify) and a learned explainer
for a frozen model (AHA): one task each, one process; rerunning the same flow resumes it."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from prefect import flow, task
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from eive_audit.pipeline.config import ExplainerTrainConfig, TrainConfig
from eive_audit.pipeline.train import train
from eive_audit.pipeline.train_classify import train_classifier
from eive_audit.pipeline.train_explainer import train_aha


def _losses_text(losses: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.3f}" for name, value in losses.items())


@dataclass
class ProgressLines:
    """`on_step` for a log or a pipe, where a progress bar shows nothing until it ends: every `every` steps,
    and at the last, one line `step S/N loss L [AAJTS parts] elapsed Ts rate R steps/s` on stderr. Elapsed
    is the wall time of this process (loading included); the rate is over the steps since the previous line,
    so it follows the current speed."""

    total: int
    every: int
    started: float = field(default_factory=time.perf_counter)
    _previous: tuple[int, float] | None = field(default=None, init=False)  # (step, time) of the last line

    def __call__(self, step: int, losses: dict[str, float]) -> None:
        if self._previous is None:  # a resumed run starts after its checkpoint
            self._previous = (step - 1, self.started)
        if step % self.every and step != self.total:
            return
        now = time.perf_counter()
        rate = (step - self._previous[0]) / max(now - self._previous[1], 1e-9)
        print(f"step {step}/{self.total} {_losses_text(losses)} elapsed {now - self.started:.1f}s "
              f"rate {rate:.3g} steps/s", file=sys.stderr, flush=True)
        self._previous = (step, now)


def _showing_progress(run: Callable[..., dict[str, Any]], config: Any, what: str) -> dict[str, Any]:
    """`run(config, on_step=...)` with its progress on stderr: on a terminal a bar with the step and the
    current logged values, else `ProgressLines` every `config.log_every` steps."""
    if not sys.stderr.isatty():
        return run(config, on_step=ProgressLines(config.steps, config.log_every))
    columns = [TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[losses]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task(what, total=config.steps, losses="")

        def show(step: int, losses: dict[str, float]) -> None:
            progress.update(bar, completed=step, losses=_losses_text(losses))

        return run(config, on_step=show)


@task(name="train-steps", task_run_name="train-{config.task}-steps")
def train_task(config: TrainConfig) -> dict[str, float]:
    """Run the task's training loop (`train`, or `train_classifier` for task classify) with its progress: the
    loss; with AAJTS, its concentration and stability terms too; for a classifier, the batch's accuracy."""
    return _showing_progress(train_classifier if config.task == "classify" else train, config, "training")


@flow(name="train", flow_run_name="train-{config.task}")
def train_flow(config: TrainConfig) -> dict[str, float]:
    """Train (or resume) the model described by `config` (a detector, or a classifier for task classify);
    returns the training summary."""
    return train_task(config)


@task(name="train-explainer-steps", task_run_name="train-{config.method}-steps")
def train_explainer_task(config: ExplainerTrainConfig) -> dict[str, Any]:
    """Run the learned explainer's training loop with its progress: the loss, its deletion and ascending
    AUCs, its peak penalty and the Sinkhorn temperature."""
    return _showing_progress(train_aha, config, f"training {config.method}")


@flow(name="train-explainer", flow_run_name="train-{config.method}")
def train_explainer_flow(config: ExplainerTrainConfig) -> dict[str, Any]:
    """Train (or resume) the learned explainer described by `config` for its frozen model; returns the
    training summary."""
    return train_explainer_task(config)
