"""Prefect flow that trains a detector: one task, one process; rerunning the same flow resumes it."""

from __future__ import annotations

from prefect import flow, task
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from eive_audit.pipeline.config import TrainConfig
from eive_audit.pipeline.train import train


@task(name="train-detector-steps")
def train_task(config: TrainConfig) -> dict[str, float]:
    """Run the training loop with a progress bar showing the step and the current losses (with AAJTS, its
    concentration and stability terms too)."""
    columns = [TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[losses]}"),
               TimeRemainingColumn()]
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task("train", total=config.steps, losses="")

        def show(step: int, losses: dict[str, float]) -> None:
            progress.update(bar, completed=step, losses=" ".join(f"{k} {v:.3f}" for k, v in losses.items()))

        return train(config, on_step=show)


@flow(name="train-detector")
def train_flow(config: TrainConfig) -> dict[str, float]:
    """Train (or resume) the detector described by `config`; returns the training summary."""
    return train_task(config)
