"""The `eive-audit` command line. Each command is a thin shell over a library function."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Audit DETR-family detectors with EIVE saliency.")
err = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator:
    """A rich progress bar on stderr; yields `advance(n)`, so library code stays free of UI."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


@app.command()
def synth(
    out: Path = typer.Option(..., help="output directory"),
    n_train: int = typer.Option(2000, help="train images"),
    n_val: int = typer.Option(200, help="val images"),
    seed: int = typer.Option(0),
    image_size: int = typer.Option(128),
    cue_rate: float = typer.Option(0.95, help="share of cued-class objects drawn with the cue"),
    val_cue_alone_rate: float = typer.Option(0.1, help="share of val images with a lone cue"),
) -> None:
    """Render a synthetic planted-cue dataset in COCO format."""
    from pipeline.sources.synthetic import SynthParams, generate

    params = SynthParams(image_size=image_size, cue_rate=cue_rate)
    with progress_bar("rendering", n_train + n_val) as advance:
        written = generate(out, n_train, n_val, seed, params, val_cue_alone_rate, advance)
    typer.echo(json.dumps({split: str(path) for split, path in written.items()}))


@app.command("init-model")
def init_model(
    family: str = typer.Option(..., help="detr-r50 | conditional-detr | dab-detr | conditional-detr-small"),
    num_labels: int = typer.Option(..., min=1),
    out: Path = typer.Option(...),
    seed: int = typer.Option(0),
) -> None:
    """Write a random-init model directory of a real architecture (nobody here can download weights)."""
    from pipeline.models.families import FAMILIES, write_random_model

    if family not in FAMILIES:
        _fail(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    write_random_model(family, [f"LABEL_{i}" for i in range(num_labels)], out, seed)
    typer.echo(str(out))


@app.command()
def train(
    coco: Path = typer.Option(..., help="COCO annotation json"),
    images: Path = typer.Option(..., help="image root"),
    out: Path = typer.Option(..., help="model directory to write"),
    family: str = typer.Option("conditional-detr-small", help="architecture when training from scratch"),
    init: Optional[Path] = typer.Option(None, help="fine-tune this model directory instead"),
    steps: int = typer.Option(6000),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(5e-4),
    checkpoint_every: int = typer.Option(500),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
) -> None:
    """Train (or resume, or fine-tune) a detector; runs as the Prefect flow `train-detector`."""
    from flows.train import train_flow
    from pipeline.train import TrainConfig

    config = TrainConfig(coco=coco, images=images, out=out, family=family, init=init, steps=steps,
                         batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, seed=seed, device=device)
    typer.echo(json.dumps(train_flow(config)))


def _evaluate(coco: Path, images: Path, model: str, batch_size: int, device: str) -> dict:
    from pipeline.evaluation import coco_metrics
    from pipeline.models.detr import DetrAdapter, ModelLoadError
    from pipeline.sources import CocoSource, SourceFormatError

    try:
        source = CocoSource(coco, images)
        adapter = DetrAdapter.load(model, device)
    except (SourceFormatError, ModelLoadError) as exc:
        _fail(str(exc))
    with progress_bar("evaluating", len(source)) as advance:
        return coco_metrics(adapter, source, batch_size, advance)


@app.command("eval")
def evaluate(
    coco: Path = typer.Option(..., help="COCO annotation json"),
    images: Path = typer.Option(..., help="image root"),
    model: str = typer.Option("default", help="model directory, hub id, or `default` (the shipped model)"),
    batch_size: int = typer.Option(16),
    device: str = typer.Option("auto"),
) -> None:
    """Print COCO metrics (AP, AP50, AP75) of a model as JSON."""
    typer.echo(json.dumps(_evaluate(coco, images, model, batch_size, device)))


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, help="where to render the demo data (default: a temp dir)"),
    n_val: int = typer.Option(200),
    seed: int = typer.Option(1234, help="a seed the shipped model never saw"),
) -> None:
    """Render a fresh synthetic val set and print the shipped model's COCO metrics on it."""
    from pipeline.sources.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        root = out or Path(tmp)
        with progress_bar("rendering", n_val) as advance:
            written = generate(root, 0, n_val, seed, progress=advance)
        metrics = _evaluate(written["val"], root / "images" / "val", "default", 16, "auto")
    typer.echo(json.dumps({"model": "default", "data": f"synthetic val, seed {seed}, {n_val} images", **metrics}))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
