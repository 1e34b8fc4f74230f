"""Prefect flow that trains a detector: one task, one process; rerunning the same flow resumes it."""

from __future__ import annotations

from prefect import flow, task
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.train import TrainConfig, train


@task(name="train-detector-steps")
def train_task(config: TrainConfig) -> dict[str, float]:
    """Run the training loop with a progress bar showing the step and the current loss."""
    columns = [TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeRemainingColumn()]
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task("train", total=config.steps, loss="-")
        return train(config, on_step=lambda step, loss: progress.update(bar, completed=step, loss=f"{loss:.3f}"))


@flow(name="train-detector")
def train_flow(config: TrainConfig) -> dict[str, float]:
    """Train (or resume) the detector described by `config`; returns the training summary."""
    return train_task(config)
