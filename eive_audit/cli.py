"""The `eive-audit` command line. Each command is a thin shell over a library function."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from eive_audit.pipeline.config import AuditConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Audit DETR-family detectors with EIVE saliency.")
err = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator:
    """A rich progress bar on stderr; yields `advance(n)`, so library code stays free of UI."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def _fail(message: str) -> NoReturn:
    """Print `message` as an error and exit with code 2; verbatim (no markup, no wrapping), so it can be grepped."""
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
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
    from eive_audit.pipeline.sources.synthetic import SynthParams, generate

    params = SynthParams(image_size=image_size, cue_rate=cue_rate)
    with progress_bar("rendering", n_train + n_val) as advance:
        written = generate(out, n_train, n_val, seed, params, val_cue_alone_rate, advance)
    typer.echo(json.dumps({split: str(path) for split, path in written.items()}))


@app.command("init-model")
def init_model(
    family: str = typer.Option(..., help="detr-r50 | conditional-detr | dab-detr | deformable-detr | rt-detr | "
                                         "conditional-detr-small | deformable-detr-small"),
    num_labels: int = typer.Option(..., min=1),
    out: Path = typer.Option(...),
    seed: int = typer.Option(0),
) -> None:
    """Write a random-init model directory of a real architecture (nobody here can download weights)."""
    from eive_audit.pipeline.models.families import FAMILIES, write_random_model

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
    aajts: bool = typer.Option(False, "--aajts", help="attention-aware joint training (METHODS.md 1d)"),
    lambda_in: float = typer.Option(0.5, min=0.0, help="AAJTS concentration weight"),
    lambda_stab: float = typer.Option(0.1, min=0.0, help="AAJTS stability weight"),
) -> None:
    """Train (or resume, or fine-tune) a detector; runs as the Prefect flow `train-detector`."""
    from eive_audit.flows.train import train_flow
    from eive_audit.pipeline.train import TrainConfig

    config = TrainConfig(coco=coco, images=images, out=out, family=family, init=init, steps=steps,
                         batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, seed=seed, device=device,
                         aajts=aajts, lambda_in=lambda_in, lambda_stab=lambda_stab)
    try:
        summary = train_flow(config)
    except ValueError as exc:  # a dataset or model the run cannot use, e.g. AAJTS on a deformable model
        _fail(str(exc))
    typer.echo(json.dumps(summary))


def _evaluate(coco: Path, images: Path, model: str, batch_size: int, device: str) -> dict:
    from eive_audit.pipeline.evaluation import coco_metrics
    from eive_audit.pipeline.models.detr import DetrAdapter, ModelLoadError
    from eive_audit.pipeline.sources import CocoSource, SourceFormatError

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
def run(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, help="YAML file of AuditConfig fields; flags given here override it"),
    images: Optional[Path] = typer.Option(None, help="image root (with --coco) or a plain image folder; required "
                                                     "unless --config gives it"),
    out: Optional[Path] = typer.Option(None, help="store root: Parquet tables and catalog.duckdb; required unless "
                                                  "--config gives it"),
    coco: Optional[Path] = typer.Option(None, help="COCO annotation json"),
    model: str = typer.Option("default", help="model directory, hub id, or `default`"),
    explainer: str = typer.Option("eive", help="comma-separated explainer names"),
    fusion: str = typer.Option("product", help="EIVE layer fusion: product | clhcf | last | mean | max"),
    score_threshold: float = typer.Option(0.5),
    max_detections: int = typer.Option(100),
    batch_size: int = typer.Option(8),
    shard_size: int = typer.Option(64),
    faithfulness: str = typer.Option("none", help="none | all | sample:N | flagged (tp with mass_in_gt < 0.3)"),
    faithfulness_steps: int = typer.Option(20),
    faithfulness_baseline: str = typer.Option("blur", help="blur | mean | noise"),
    faithfulness_protocol: str = typer.Option("standard", help="standard | odam (with --faithfulness-baseline noise)"),
    findings: bool = typer.Option(True, "--findings/--no-findings", help="flag spurious attention, find and verify cues"),
    spurious_off_object: float = typer.Option(0.4, help="flag tp / dup / fn with this map share off their object"),
    spurious_background: float = typer.Option(0.5, help="flag fp with this map share off every GT object"),
    cue_min_support: int = typer.Option(5, help="flagged instances a cluster needs to be a candidate cue"),
    verify_budget: int = typer.Option(5000, help="instances re-scored with their surroundings blurred (flagged first)"),
    localise_budget: int = typer.Option(15000, help="forwards spent localising confirmed reliance (one per window)"),
    drise_masks: int = typer.Option(1000, help="random masks per image of the drise explainer"),
    device: str = typer.Option("auto"),
    fiftyone_dataset: Optional[str] = typer.Option(None, help="push the finished run to this FiftyOne dataset"),
    report: bool = typer.Option(True, "--report/--no-report", help="write STORE/reports/<run_id>.html at the end"),
) -> None:
    """Audit a dataset: detect, explain and score every instance; prints the run id and a summary.

    Settings come from flags, a YAML file of AuditConfig fields (--config), or both: a flag given on the
    command line wins over the file."""
    typer.echo(json.dumps(_audit(_load_config(config, _given_settings(ctx)))))


def _given_settings(ctx: typer.Context) -> dict[str, object]:
    """The command's options that the user gave (on the command line or in the environment), as AuditConfig
    fields. Only these are passed on, so a flag left out neither overrides the config file nor pins a
    default: AuditConfig's defaults stay the single source (a test checks the flags' shown defaults match).
    """
    # By name: typer vendors click, and its ParameterSource enum is not public API.
    given = {name for name in ctx.params if (source := ctx.get_parameter_source(name)) and source.name != "DEFAULT"}
    settings: dict[str, object] = {}
    for name in sorted(given - {"config"}):
        section, field = _FLAT_FLAGS.get(name, (None, name))
        value = ctx.params[name]
        if section is None:
            settings[field] = value
        elif section == "explainers":
            settings.setdefault("explainers", {}).setdefault("eive" if field == "fusion" else "drise", {})[
                "fusion" if field == "fusion" else "n_masks"] = value
        else:
            settings.setdefault(section, {})[field] = value
    if "explainer" in settings:
        names = str(settings.pop("explainer")).split(",")
        params = settings.pop("explainers", {})
        settings["explainers"] = {name: params.get(name, {}) for name in names}
    return settings


# Transitional: flat flags of `run` -> (part, field) of the nested AuditConfig.
_FLAT_FLAGS = {
    "fusion": ("explainers", "fusion"), "drise_masks": ("explainers", "n_masks"),
    "faithfulness": ("faithfulness", "instances"), "faithfulness_steps": ("faithfulness", "steps"),
    "faithfulness_baseline": ("faithfulness", "baseline"), "faithfulness_protocol": ("faithfulness", "protocol"),
    "findings": ("findings", "enabled"), "spurious_off_object": ("findings", "off_object"),
    "spurious_background": ("findings", "background"), "cue_min_support": ("findings", "min_support"),
    "verify_budget": ("findings", "verify_budget"), "localise_budget": ("findings", "localise_budget"),
    "fiftyone_dataset": ("review", "fiftyone_dataset"), "report": ("review", "report"),
}


def _load_config(config_file: Path | None, settings: dict[str, object]) -> "AuditConfig":
    """`settings` over the YAML file's (if any) as an AuditConfig; bad settings exit with one line per problem."""
    from eive_audit.pipeline.config import AuditConfig
    from pydantic import ValidationError

    try:
        return AuditConfig.from_yaml(config_file, **settings) if config_file else AuditConfig(**settings)
    except ValidationError as exc:
        _fail("bad audit settings: " + "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}"
                                                 for e in exc.errors()))
    except ValueError as exc:  # the YAML file: unreadable, not a mapping, an unknown key
        _fail(str(exc))


def _audit(config: "AuditConfig") -> dict:
    """Run the audit flow; input that turns out bad (a source, a model) exits with a message."""
    from eive_audit.flows.audit import audit
    from eive_audit.pipeline.models.detr import ModelLoadError
    from eive_audit.pipeline.sources import SourceFormatError
    from eive_audit.storage.versions import SchemaVersionError

    try:
        return audit(config)
    except (SourceFormatError, ModelLoadError, NotADirectoryError, ValueError, SchemaVersionError) as exc:
        _fail(str(exc))


@app.command()
def sql(
    statement: str = typer.Argument(..., help="one SELECT over the views runs, images, instances, maps, errors"),
    store: Path = typer.Option(..., help="store root"),
    format: str = typer.Option("table", help="table | csv | json"),
) -> None:
    """Query a store's catalog read-only."""
    from eive_audit.storage.catalog import query

    if format not in ("table", "csv", "json"):
        _fail(f"--format must be table, csv or json, not {format!r}")
    try:
        result = query(store, statement)
    except Exception as exc:  # DuckDB raises many types: a parse error, a missing column, a refused write
        _fail(str(exc))
    _print_table(result, format)


def _print_table(result, format: str) -> None:
    rows = result.to_pylist()
    if format == "json":
        typer.echo(json.dumps(rows, default=str))
    elif format == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=result.column_names)
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.table import Table

        table = Table(*result.column_names)
        for row in rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
        piped = not sys.stdout.isatty()  # rich wraps cells at 80 columns off a terminal; a file keeps rows whole
        Console(width=10_000 if piped else None).print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-store"), help="store root; the synthetic data goes in OUT/data"),
    n_val: int = typer.Option(200),
    seed: int = typer.Option(1234, help="a seed the shipped model never saw"),
    fiftyone_dataset: Optional[str] = typer.Option(None, help="also push the run to this FiftyOne dataset"),
) -> None:
    """Audit a synthetic planted-cue val set with the shipped model and show what to review.

    Prints the correct detections that look least at their object, the candidate cues, and where the HTML
    report is."""
    from eive_audit.pipeline.sources.synthetic import generate
    from eive_audit.storage.catalog import query

    data = out / "data"
    ann = data / "annotations" / "val.json"
    if not ann.is_file():
        with progress_bar("rendering", n_val) as advance:
            generate(data, 0, n_val, seed, progress=advance)
    summary = _audit(_load_config(None, {"images": data / "images" / "val", "coco": ann, "out": out,
                                         "review": {"fiftyone_dataset": fiftyone_dataset}}))
    typer.echo(json.dumps(summary))
    worst = query(out, "SELECT instance_id, label_name, round(score, 3) AS score, round(iou, 3) AS iou, "
                       "round(mass_in_gt, 3) AS mass_in_gt, peak_in_gt FROM instances "
                       "WHERE run_id = ? AND outcome = 'tp' ORDER BY mass_in_gt LIMIT 10", [summary["run_id"]])
    err.print("[bold]Correct detections with the least saliency on their object[/bold] (read back through DuckDB):")
    _print_table(worst, "table")
    cues = query(out, "SELECT cue_id, support, round(mean_spurious_score, 3) AS mean_score, "
                      "round(verification_drop, 3) AS drop_when_blurred, confirmed, exemplar_ids[1:3] AS exemplars "
                      "FROM findings WHERE run_id = ? ORDER BY confirmed DESC, support DESC", [summary["run_id"]])
    err.print("[bold]Candidate cues[/bold]: off-object peaks that many detections of a class share; confirmed when "
              "blurring the cue region costs half the detections' score:")
    _print_table(cues, "table")
    err.print(f"HTML report: {summary['report']}")
    if fiftyone_dataset:
        err.print(f"FiftyOne dataset: {fiftyone_dataset} (browse it with `eive-audit app --dataset {fiftyone_dataset}`)")


def _finished_run(store: Path, run: str | None) -> str:
    """`run` checked to be a finished run of the store, or, when None, the store's latest finished run
    (by finish time); a missing store or an unknown run exits with a message."""
    from eive_audit.storage.catalog import catalog_path, query

    if not catalog_path(store).is_file():
        _fail(f"no store at {store} (no {catalog_path(store).name} there); pass the --out of an `eive-audit run`")
    finished = query(store, "SELECT run_id FROM runs WHERE status = 'finished' ORDER BY finished_at DESC, run_id"
                     ).column("run_id").to_pylist()
    if run is None and not finished:
        _fail(f"no finished run in the store at {store}")
    if run is not None and run not in finished:
        _fail(f"no finished run {run!r} in the store at {store}; finished runs, latest first: "
              f"{', '.join(finished) or 'none'}")
    return run or finished[0]


_RUN_HELP = "run id; default: the latest finished run in the store"


@app.command()
def push(
    store: Path = typer.Option(..., help="store root"),
    run: Optional[str] = typer.Option(None, help=_RUN_HELP),
    dataset: str = typer.Option(..., help="FiftyOne dataset to create or update"),
) -> None:
    """Push a run to a FiftyOne dataset (detections, GT, saliency heatmaps, scores) for review in the App."""
    run_id = _finished_run(store, run)  # before importing FiftyOne, which starts its database
    from eive_audit.reports.fiftyone_push import push_run

    typer.echo(json.dumps(push_run(store, run_id, dataset), default=str))


@app.command()
def report(
    store: Path = typer.Option(..., help="store root"),
    out: Path = typer.Option(..., help="HTML file to write"),
    run: Optional[str] = typer.Option(None, help=_RUN_HELP),
) -> None:
    """Write a run's self-contained HTML report; prints its path."""
    run_id = _finished_run(store, run)
    from eive_audit.reports.html_report import write_report

    typer.echo(str(write_report(store, run_id, out)))


@app.command("app")
def review_app(
    dataset: str = typer.Option(..., help="FiftyOne dataset (see `eive-audit push`)"),
    port: int = typer.Option(5151, min=1, max=65535),
    address: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 opens the App to the network"),
) -> None:
    """Serve the FiftyOne App on a dataset until interrupted (Ctrl-C or SIGTERM)."""
    import signal

    from eive_audit.reports.fiftyone_push import launch_app

    # SIGTERM (a service manager, `kill`) stops the App as Ctrl-C does; otherwise Python dies without cleanup
    # and leaves FiftyOne's server and database processes running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        launch_app(dataset, port=port, address=address, wait=True)
    except ValueError as exc:  # FiftyOne raises ValueError for a dataset that does not exist
        _fail(str(exc))


@app.command()
def schedule(
    config: Path = typer.Option(..., help="YAML file of AuditConfig fields (as `run --config`)"),
    cron: str = typer.Option(..., help='cron string: minute hour day-of-month month day-of-week, e.g. "0 2 * * *"'),
    name: Optional[str] = typer.Option(None, help="deployment name; default: the config file's name without .yaml"),
) -> None:
    """Serve the audit as a Prefect deployment on a cron schedule (needs a Prefect server).

    Registers `audit/NAME` on the server at PREFECT_API_URL and runs its audits until interrupted; a run can
    also be started at once from the UI or with `prefect deployment run audit/NAME`."""
    from eive_audit.flows.schedule import NoServerError, serve_audit

    try:
        serve_audit(_load_config(config, {}), cron, name or config.stem)
    except (NoServerError, ValueError) as exc:
        _fail(str(exc))


def main() -> None:
    # Offline by design: no telemetry from Prefect's temporary server or FiftyOne unless the user asks.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    app()


if __name__ == "__main__":
    main()
