"""The `eive-audit` command line. Each command is a thin shell over a library function.

The flags of `run`, `train` and `train-explainer` are built from the fields of AuditConfig, TrainConfig and
ExplainerTrainConfig (pipeline.config),
so a setting's default and help are written once, there. Every built flag defaults to "not given": only
the flags given are passed on (for `run`, merged over `--config FILE`) and the config applies its own
defaults to the rest, which --help shows as "[default: X]". A field's flag is named:
- top-level field -> `--field-name` (underscores as dashes);
- a part's field -> `--{part}-{field}` (`--faithfulness-steps`, `--findings-off-object`); a part's `enabled`
  -> `--{part}` (`--findings/--no-findings`); the review part's fields are not prefixed (`--report`,
  `--fiftyone-dataset`): they say what they are;
- a field whose metadata holds a `flag` takes that name (faithfulness.instances -> `--faithfulness`);
- a bool -> `--x/--no-x`;
- explainers: `--explainer a,b` chooses them; each parameter of a parametrised explainer (EXPLAINER_SETTINGS)
  -> `--{explainer}-{param}` (`--eive-fusion`, `--drise-n-masks`); a parameter of an explainer that is not
  chosen is an error.
Argument errors answer before torch, transformers or Prefect load; so does a run that cannot work (a
missing model, image folder or annotation file, an unknown explainer, or one the model's family cannot run).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import inspect
import json
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional, TypeVar, get_args

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from eive_audit.explainers import BUILTIN, capabilities, check_supported
from eive_audit.pipeline.config import (EXPLAINER_SETTINGS, AuditConfig, ExplainerTrainConfig, ReviewConfig,
                                        TrainConfig, did_you_mean, merge_settings)
from eive_audit.pipeline.models.families import FAMILIES, VIT_FAMILIES, Family, family_of_model
from eive_audit.pipeline.models.labels import label_to_category, labels_of_model
from eive_audit.pipeline.models.loading import task_of_model
from eive_audit.pipeline.models.locate import ModelLoadError
from eive_audit.pipeline.progress import Advance, listening, step

T = TypeVar("T")
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Audit DETR-family detectors with EIVE saliency.")
err = Console(stderr=True)


@contextmanager
def showing_progress() -> Iterator[None]:
    """Show the progress steps the command's code reports (pipeline.progress) on stderr while the block runs:
    on a terminal a rich bar per step; elsewhere (a pipe, a log file, CI) one line per step as it ends, so a
    log says what took how long without a screenful of redraws. stdout stays for the command's result."""
    if not err.is_terminal:
        with listening(_step_line):
            yield
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=err) as bars:
        @contextmanager
        def bar(name: str, total: int | None) -> Iterator[Advance]:
            task = bars.add_task(name, total=total)
            try:
                yield lambda n=1: bars.advance(task, n)
            finally:  # a step of unknown length is complete when it ends
                bars.update(task, total=bars.tasks[task].completed if total is None else total)

        with listening(bar):
            yield


@contextmanager
def _step_line(name: str, total: int | None) -> Iterator[Advance]:
    """A step off a terminal: counted quietly, one line when it ends (also when it fails)."""
    done, begun = 0, time.perf_counter()

    def advance(n: int = 1) -> None:
        nonlocal done
        done += n

    ended = "stopped"
    try:
        yield advance
        ended = "done"
    finally:
        count = f" {done}/{total}" if total is not None else ""
        err.print(f"{name}:{count} {ended} in {time.perf_counter() - begun:.1f} s", soft_wrap=True, highlight=False,
                  markup=False)


TERMINATION_GRACE_S = 5.0  # after SIGTERM or Ctrl-C, a flow's process has this long to unwind, then it exits
_TERMINATING = (signal.SIGTERM, signal.SIGINT)
# Set by main(): only the command's own process may be ended by the deadline below, not a process that runs
# the app in-process (tests/cli.py, a user's Python), whose own shutdown is its business.
_OWN_PROCESS = threading.Event()


@contextmanager
def exit_soon_after_termination() -> Iterator[None]:
    """While the block runs a flow in this process, SIGTERM or SIGINT leaves the process
    TERMINATION_GRACE_S to unwind (Prefect marks the flow run crashed, finally blocks run), then it exits
    with 128 + the signal's number, whatever is still running.

    Why a deadline: during a flow run, Prefect's engine owns SIGTERM (its handler replaces any other and
    raises TerminationSignal), then reports the crash to its API, retrying for ~150 s when that API is gone
    (a SIGTERM or Ctrl-C to the process group stops the ephemeral server too), and interpreter exit waits
    for the task runner's threads. Nothing it leaves half done is lost: a shard's files are written
    atomically and the done-marker last, so a rerun resumes, and the server dies with its parent
    (flows.ephemeral). How it sees the signal under Prefect's handler: the interpreter's C-level handler
    writes each caught signal's number to the wakeup fd, whichever Python handler is installed; a watcher
    thread reads it. Only the main thread may set that fd; elsewhere, and in-process, the block runs unguarded."""
    if not _OWN_PROCESS.is_set() or threading.current_thread() is not threading.main_thread():
        yield
        return
    read, write = os.pipe()
    os.set_blocking(write, False)  # the C handler must never block
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    threading.Thread(target=_exit_after_grace, args=(read,), name="eive-audit-termination", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write)  # the watcher reads end-of-file and ends, unless a signal has armed it already


def _exit_after_grace(read: int) -> None:
    """The watcher: on the first SIGTERM or SIGINT read from the wakeup pipe, wait TERMINATION_GRACE_S and
    end the process (os._exit: no atexit, no thread joins left to wait on)."""
    with os.fdopen(read, "rb", buffering=0) as pipe:
        while chunk := pipe.read(64):
            caught = [number for number in chunk if number in _TERMINATING]
            if caught:
                time.sleep(TERMINATION_GRACE_S)
                name = signal.Signals(caught[0]).name
                os.write(2, f"eive-audit: still stopping {TERMINATION_GRACE_S:g} s after {name}; exiting now. "
                            "What finished is kept: rerun the same command to resume.\n".encode())
                os._exit(128 + caught[0])


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` as an error and exit with `code`: 2 for input the command cannot use, 1 for a run that
    finished but failed the user's bar; verbatim (no markup, no wrapping), so it can be grepped."""
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=code)


@dataclass(frozen=True)
class Flag:
    """A command-line option built from a config field: `path` is where its value goes in the config's
    settings (("faithfulness", "steps"), ("explainers", "eive", "fusion")), `name` the option without dashes."""

    path: tuple[str, ...]
    name: str
    field: FieldInfo
    from_file: bool  # the command also reads a --config file
    aliases: tuple[str, ...] = ()  # other spellings, without dashes (a field's json_schema_extra "aliases")

    @property
    def parameter(self) -> inspect.Parameter:
        """The typer option: "not given" (None) by default, the field's description as help, its default shown."""
        kind = _option_type(self.field.annotation)
        decls = f"--{self.name}/--no-{self.name}" if kind is bool else f"--{self.name}"
        aliases = [f"--{alias}" for alias in self.aliases]
        help = self.field.description or ""
        if self.path == ("explainer",):
            help += f"; comma-separated names of {', '.join(map(capabilities, BUILTIN))}"
        if self.field.is_required():
            help += " (required unless --config gives it)" if self.from_file else " (required)"
        default = _shown_default(self.field)
        option = typer.Option(None, decls, *aliases, help=help, show_default=default if default is not None else False)
        return inspect.Parameter(self.name.replace("-", "_"), inspect.Parameter.KEYWORD_ONLY, default=option,
                                 annotation=Optional[kind])


def _option_type(annotation: Any) -> type:
    """The click type of a field: bool, int, float and Path as they are; str for the rest (a Literal too, so
    that pydantic, not click, names the allowed values in one line)."""
    kinds = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    return next((k for k in (bool, int, float, Path) if kinds[0] is k), str)


def _shown_default(field: FieldInfo) -> str | None:
    """What --help shows as the default: the field's default (explainers: their names), None when it has none."""
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    if isinstance(value, dict):
        return ",".join(value)
    return None if value is None else str(value)


def config_flags(model: type[BaseModel], from_file: bool, path: tuple[str, ...] = (), prefix: str = "") -> list[Flag]:
    """The flags of every leaf field of `model`, recursively, named by the rules of this module's docstring."""
    flags = []
    for name, field in model.model_fields.items():
        part = field.annotation
        if isinstance(part, type) and issubclass(part, BaseModel):
            flags += config_flags(part, from_file, (*path, name), "" if name == "review" else f"{name}-")
        elif name == "explainers" and model is AuditConfig:
            flags.append(Flag(("explainer",), "explainer", field, from_file))  # the choice; parameters: below
            for explainer, settings in EXPLAINER_SETTINGS.items():
                flags += config_flags(settings, from_file, (name, explainer), f"{explainer}-")
        else:
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            own = prefix.rstrip("-") if name == "enabled" else f"{prefix}{name}".replace("_", "-")
            flags.append(Flag((*path, name), str(extra.get("flag") or own), field, from_file,
                              tuple(extra.get("aliases", ()))))
    return flags


def _with_flags(command: Callable, flags: list[Flag]) -> Callable:
    """`command` with its signature (what typer reads) extended by one keyword option per flag; the values
    arrive in its `**given`."""
    own = [p for p in inspect.signature(command).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*own, *(flag.parameter for flag in flags)])  # type: ignore[attr-defined]
    return command


def _given(flags: list[Flag], values: dict[str, Any]) -> dict[str, Any]:
    """The flags given (not None) as nested settings: {"faithfulness": {"steps": 5}, "explainer": "a,b",
    "explainers": {"eive": {"fusion": "last"}}, ...}."""
    settings: dict[str, Any] = {}
    for flag in flags:
        value = values.get(flag.name.replace("-", "_"))
        if value is not None:
            *parts, leaf = flag.path
            target = settings
            for part in parts:
                target = target.setdefault(part, {})
            target[leaf] = value
    return settings


def _bad_settings(exc: ValidationError, flags: list[Flag], what: str) -> NoReturn:
    """One line for all of a config's errors, each named by its flag (or its place in the config file)."""
    names = {flag.path: f"--{flag.name}" for flag in flags} | {("explainers",): "--explainer"}

    def where(loc: tuple) -> str:
        path = tuple(map(str, loc))
        return names.get(path) or ".".join(path) or "config"

    def message(error: Any) -> str:
        text = error["msg"].removeprefix("Value error, ")
        if error["type"] == "literal_error" and isinstance(error["input"], str):  # a typo'd choice
            choices = re.findall(r"'([^']*)'", error["ctx"]["expected"])
            text = f"{text}, not {error['input']!r}; {did_you_mean(error['input'], choices)}".rstrip("; ")
        return text

    _fail(f"bad {what} settings: " + "; ".join(f"{where(e['loc'])}: {message(e)}" for e in exc.errors()))


RUN_FLAGS = config_flags(AuditConfig, from_file=True)
TRAIN_FLAGS = config_flags(TrainConfig, from_file=False)
EXPLAINER_TRAIN_FLAGS = config_flags(ExplainerTrainConfig, from_file=False)


@app.command()
def synth(
    out: Path = typer.Option(..., help="output directory"),
    task: str = typer.Option("detect", help="detect: scenes of several objects, COCO json; classify: one object per "
                                            "image, a classification index (json)"),
    n_train: int = typer.Option(2000, help="train images"),
    n_val: int = typer.Option(200, help="val images"),
    seed: int = typer.Option(0),
    generator: str = typer.Option("compact-patch", help="planted-cue world (detect), a name of GENERATORS in "
                                                        "pipeline/sources/synthetic.py"),
    image_size: Optional[int] = typer.Option(None, help="image side in pixels; none: the generator's"),
    cue_rate: Optional[float] = typer.Option(None, help="share of cued-class objects drawn with the cue; "
                                                         "none: the generator's"),
    val_cue_alone_rate: float = typer.Option(0.1, help="share of val images with a lone cue (detect)"),
    val_cue_other_rate: float = typer.Option(0.2, help="share of the other classes' val images that carry the cue "
                                                       "(classify)"),
) -> None:
    """Render a synthetic planted-cue dataset: COCO format (detect) or a classification index (classify)."""
    from eive_audit.pipeline.sources.synthetic import GENERATORS, generate
    from eive_audit.pipeline.sources.synthetic_classify import ClassifyParams, generate_classify

    if task not in ("detect", "classify"):
        _fail(f"--task must be detect or classify, not {task!r}; {did_you_mean(task, ('detect', 'classify'))}")
    if task == "detect" and generator not in GENERATORS:
        _fail(f"unknown generator {generator!r}; {did_you_mean(generator, GENERATORS)}"
              f"choose one of {', '.join(GENERATORS)}")
    changes = {k: v for k, v in (("image_size", image_size), ("cue_rate", cue_rate)) if v is not None}
    try:
        params = (dataclasses.replace(ClassifyParams(), **changes) if task == "classify"
                  else dataclasses.replace(GENERATORS[generator], **changes))
    except ValueError as exc:
        _fail(f"bad synth settings: {exc}")
    with showing_progress(), step("rendering", n_train + n_val) as advance:
        if task == "classify":
            written = generate_classify(out, n_train, n_val, seed, params, val_cue_other_rate, advance)
        else:
            written = generate(out, n_train, n_val, seed, params, val_cue_alone_rate, advance)
    typer.echo(json.dumps({split: str(path) for split, path in written.items()}))


@app.command("init-model")
def init_model(
    family: str = typer.Option(..., help=" | ".join([*FAMILIES, *VIT_FAMILIES])),
    num_labels: int = typer.Option(..., min=1),
    out: Path = typer.Option(...),
    seed: int = typer.Option(0),
) -> None:
    """Write a random-init model directory of a real architecture (nobody here can download weights)."""
    from eive_audit.pipeline.models.families import write_random_model

    if family not in FAMILIES and family not in VIT_FAMILIES:
        _fail(f"unknown family {family!r}; {did_you_mean(family, [*FAMILIES, *VIT_FAMILIES])}"
              f"choose one of {', '.join([*FAMILIES, *VIT_FAMILIES])}")
    write_random_model(family, [f"LABEL_{i}" for i in range(num_labels)], out, seed)
    typer.echo(str(out))


def train(**given: Any) -> None:
    """Train (or resume, or fine-tune) a detector, or with --task classify a ViT classifier; a Prefect flow."""
    try:
        config = TrainConfig(**_given(TRAIN_FLAGS, given))
    except ValidationError as exc:
        _bad_settings(exc, TRAIN_FLAGS, "train")
    _require_data(config.coco, config.images, config.index)
    if config.init is not None:
        _family_of_model(config.init, "--init")
    from eive_audit.flows.train import train_flow

    try:
        with exit_soon_after_termination():
            summary = train_flow(config)
    except ValueError as exc:  # a dataset or model the run cannot use, e.g. AAJTS on a deformable model
        _fail(str(exc))
    typer.echo(json.dumps(summary))


app.command()(_with_flags(train, TRAIN_FLAGS))


def train_explainer(**given: Any) -> None:
    """Train (or resume) a learned explainer (AHA, METHODS.md 3d) for a frozen model; a Prefect flow. The
    directory it writes is what `run --explainer aha --aha-model DIR` reads."""
    try:
        config = ExplainerTrainConfig(**_given(EXPLAINER_TRAIN_FLAGS, given))
    except ValidationError as exc:
        _bad_settings(exc, EXPLAINER_TRAIN_FLAGS, "train-explainer")
    _require_data(config.coco, config.images, config.index)
    from eive_audit.flows.train import train_explainer_flow

    try:
        with exit_soon_after_termination():
            summary = train_explainer_flow(config)
    except ValueError as exc:  # a model the explainer cannot read (a deformable detector), data of another task
        _fail(str(exc))
    typer.echo(json.dumps(summary))


app.command("train-explainer")(_with_flags(train_explainer, EXPLAINER_TRAIN_FLAGS))


def _evaluate(coco: Path, images: Path, model: str, batch_size: int, device: str) -> dict:
    from eive_audit.pipeline.evaluation import coco_metrics
    from eive_audit.pipeline.models.detr import DetrAdapter
    from eive_audit.pipeline.sources import CocoSource, SourceFormatError

    try:
        source = CocoSource(coco, images)
        adapter = DetrAdapter.load(model, device)
    except (SourceFormatError, ModelLoadError) as exc:
        _fail(str(exc))
    with showing_progress(), step("evaluating", len(source)) as advance:
        return coco_metrics(adapter, source, batch_size, advance)


def evaluate(
    coco: Optional[Path] = typer.Option(None, help="COCO annotation json (detect)"),
    index: Optional[Path] = typer.Option(None, help="classification index, json or csv (--task classify)"),
    images: Path = typer.Option(..., help="image root"),
    task: str = typer.Option("detect", help="detect: COCO AP / AP50 / AP75; classify: top-1 accuracy, per class, "
                                            "and on synthetic planted-cue data the shortcut (accuracy with and "
                                            "without the cue)"),
    batch_size: int = typer.Option(16),
    **given: Any,
) -> None:
    """Print a model's metrics as JSON: COCO AP of a detector, top-1 accuracy of a classifier."""
    chosen = _given(EVAL_FLAGS, given)
    if task == "classify":
        if index is None:
            _fail("--task classify: give the classification index with --index")
        _require_data(None, images, index)
        from eive_audit.pipeline.train_classify import evaluate_classifier

        model = chosen.get("model", "default-vit")
        _require_task(model, "classify")
        typer.echo(json.dumps(evaluate_classifier(model, index, images, chosen.get("device", "auto"), batch_size)))
        return
    if task != "detect":
        _fail(f"--task must be detect or classify, not {task!r}; {did_you_mean(task, ('detect', 'classify'))}")
    if coco is None:
        _fail("--coco: give the COCO annotation json (or --task classify with --index)")
    chosen = {name: AuditConfig.model_fields[name].default for name in ("model", "device")} | chosen
    typer.echo(json.dumps(_evaluate(coco, images, chosen["model"], batch_size, chosen["device"])))


EVAL_FLAGS = [flag for flag in RUN_FLAGS if flag.path in (("model",), ("device",))]
app.command("eval")(_with_flags(evaluate, EVAL_FLAGS))


def run(config: Optional[Path] = typer.Option(None, help="YAML file of AuditConfig fields; flags given here "
                                                          "override it"), **given: Any) -> None:
    """Audit a dataset: detect, explain and score every instance; prints the run id and a summary.

    Settings come from flags, a YAML file of AuditConfig fields (--config), or both: a flag given on the
    command line wins over the file."""
    audit_config = _load_config(config, _given(RUN_FLAGS, given))
    _preflight(audit_config)
    summary = _audit(audit_config)
    typer.echo(json.dumps(summary))
    _check_failures(summary, audit_config)


def _check_failures(summary: dict, config: AuditConfig) -> None:
    """A run whose every image failed wrote its errors but audited nothing: say so, and do not exit 0; nor
    does one where more than `max_error_rate` of the images failed."""
    images, failed = summary["images"], summary["images"] - summary["audited"]
    see = (f"see them with: eive-audit sql --store {config.out} \"SELECT type, message FROM errors "
           f"WHERE run_id = '{summary['run_id']}'\"")
    if images and not summary["audited"]:
        _fail(f"no image could be audited: all {images} failed ({summary['errors']} errors); {see}")
    if config.max_error_rate is not None and images and failed / images > config.max_error_rate:
        _fail(f"{failed} of {images} images failed ({failed / images:.1%}), more than --max-error-rate "
              f"{config.max_error_rate:g}; {see}", code=1)


app.command()(_with_flags(run, RUN_FLAGS))


def _load_config(config_file: Path | None, settings: dict[str, Any]) -> AuditConfig:
    """`settings` (given flags) over the YAML file's (if any) as an AuditConfig; bad settings exit with one line.

    Explainer parameters apply to the explainers chosen (by --explainer, else the file, else the default),
    so they are merged once the choice is known; a parameter of an explainer not chosen is an error."""
    settings = dict(settings)
    params = settings.pop("explainers", {})
    if "explainer" in settings:
        settings["explainers"] = settings.pop("explainer")
    config = _validated(lambda: AuditConfig.from_yaml(config_file, **settings) if config_file
                        else AuditConfig(**settings))
    unchosen = sorted(set(params) - set(config.explainers))
    if unchosen:
        flags = [f"--{flag.name}" for flag in RUN_FLAGS
                 if flag.path[0] == "explainers" and flag.path[2] in params.get(flag.path[1], {})]
        _fail(f"{', '.join(flags)}: a parameter of {', '.join(unchosen)}, which the run does not use "
              f"(explainers: {', '.join(config.explainers)}); choose it with --explainer")
    if not params:
        return config
    return _validated(lambda: AuditConfig(**merge_settings(config.model_dump(), {"explainers": params})))


def _validated(build: Callable[[], AuditConfig]) -> AuditConfig:
    return _validated_part(build, "audit")


def _validated_part(build: Callable[[], T], what: str) -> T:
    """`build()`, a config or a part of one; its errors exit with one line naming their flags."""
    try:
        return build()
    except ValidationError as exc:
        _bad_settings(exc, RUN_FLAGS, what)
    except ValueError as exc:  # the YAML file: unreadable, not a mapping, an unknown key
        _fail(str(exc))


def _require_data(coco: Path | None, images: Path, index: Path | None = None) -> None:
    if coco is not None and not coco.is_file():
        _fail(f"--coco: no annotation file at {coco}")
    if index is not None and not index.is_file():
        _fail(f"--index: no classification index at {index}")
    if not images.is_dir():
        _fail(f"--images: no image folder at {images}")


def _family_of_model(model: str | Path, flag: str = "--model") -> Family | None:
    """The family of a model directory, read from its config.json (no torch); None for a hub id."""
    try:
        return family_of_model(model)
    except ValueError as exc:  # ModelLoadError, an unsupported model type
        _fail(f"{flag}: {exc}")


def _preflight(config: AuditConfig, data: bool = True) -> None:
    """Refuse a run that cannot work before Prefect starts or torch loads: a missing model, an unknown
    explainer, or one the model's family cannot run, a runner whose package is not installed, a store root
    that cannot be a folder, a CUDA device the machine lacks; with `data`, a missing annotation file or image
    folder, an annotation file that is no COCO dataset (opened here once; the flow reuses it), or one whose
    categories the model's labels cannot name."""
    if data:
        _require_data(config.coco, config.images, config.index)
    if config.runner != "threads" and importlib.util.find_spec(f"prefect_{config.runner}") is None:
        _fail(f"--runner {config.runner} needs prefect-{config.runner}, which is not installed: "
              f"pip install 'eive-audit[{config.runner}]'")
    _require_task(config.model, config.task)
    try:
        check_supported(config.explainers, _family_of_model(config.model))
    except ValueError as exc:
        _fail(str(exc))
    missing = config.missing_explainer_model()
    if missing:
        _fail(missing)
    _require_store(config.out)
    if config.device.startswith("cuda"):
        _require_cuda(config.device)
    if data:
        from eive_audit.pipeline.sources import SourceFormatError, open_source

        try:
            source = open_source(config.images, config.coco, config.index, config.task)
        except (SourceFormatError, NotADirectoryError) as exc:
            _fail(str(exc))
        labels = labels_of_model(config.model)
        if labels is not None and source.categories:
            try:
                label_to_category(labels, source.categories)
            except ValueError as exc:
                data_flag = f"--index {config.index}" if config.index else (
                    f"--coco {config.coco}" if config.coco else f"--images {config.images}")
                _fail(f"--model {config.model} cannot label {data_flag}: {exc}")


def _require_task(model: str, task: str, flag: str = "--model") -> None:
    """The model does the run's task: a detector for detect, a classifier for classify (read from its
    config, no torch; a hub id is checked once loaded)."""
    try:
        kind = task_of_model(model)
    except ValueError as exc:
        _fail(f"{flag}: {exc}")
    if kind is not None and kind != task:
        what = {"detect": "a detector", "classify": "a classifier"}
        hint = "default-vit" if task == "classify" else "default"
        _fail(f"{flag} {model} is {what[kind]}, but the run's task is {task} (--task {task}); use --task {kind}, "
              f"or a model that does {task}, such as the shipped {hint}")


def _require_store(out: Path) -> None:
    """The store root is a folder, or can be made one: a file there, or a parent that is one, is refused now
    rather than when the first table is written."""
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        _fail(f"--out: {existing} is a file; the store is a folder")
    if existing is not None and not os.access(existing, os.W_OK):
        _fail(f"--out: cannot write in {existing}")


def _require_cuda(device: str) -> None:
    """A CUDA device exists (torch is imported for this only when a cuda device is asked for)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        _fail(f"--device {device}: this machine has {count} CUDA device(s){'' if count else '; use --device cpu'}")


def _audit(config: AuditConfig) -> dict:
    """Run the audit flow, its steps' progress on stderr; input that turns out bad (a source, a model) exits
    with a message (2), and so does a finished run whose diff meets a --fail-on condition (1), after its
    summary is printed."""
    from eive_audit.flows.audit import audit
    from eive_audit.pipeline.sources import SourceFormatError
    from eive_audit.reports.diff import ThresholdBreached
    from eive_audit.storage.versions import SchemaVersionError

    try:
        with exit_soon_after_termination(), showing_progress():
            return audit(config)
    except ThresholdBreached as exc:
        typer.echo(json.dumps(exc.summary))
        _fail(str(exc), code=1)
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


def _print_table(result, format: str, console: Console | None = None) -> None:
    """Rows as JSON, CSV (on stdout, for machines: BLOBs as base64) or a rich table on `console` (stdout by
    default; BLOBs by their size, since nobody reads bytes in a table)."""
    rows = result.to_pylist()
    if format == "json":
        typer.echo(json.dumps(rows, default=_json_value))
    elif format == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=result.column_names)
        writer.writeheader()
        writer.writerows({k: _json_value(v) if isinstance(v, bytes) else v for k, v in row.items()} for row in rows)
    else:
        from rich.table import Table

        table = Table(*result.column_names)
        for row in rows:
            table.add_row(*(_cell_text(v) for v in row.values()))
        console = console or Console()
        piped = not console.is_terminal  # rich wraps cells at 80 columns off a terminal; a file keeps rows whole
        console.print(table, width=10_000 if piped else None, markup=False, highlight=False)


def _json_value(value: Any) -> Any:
    """A value json cannot write as it is: bytes as base64 text, a date as ISO 8601, anything else as str."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _cell_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


def demo(
    out: Path = typer.Option(Path("demo-store"), help="store root; the synthetic data goes in OUT/data"),
    n_val: int = typer.Option(200),
    seed: int = typer.Option(1234, help="a seed the shipped model never saw"),
    **given: Any,
) -> None:
    """Audit a synthetic planted-cue val set with the shipped model and show what to review.

    Takes the flags of `run` but the data ones, with the same defaults; `--task classify` audits a synthetic
    classification val set with the shipped ViT. Prints the instances most likely right or wrong for the wrong
    reason, the candidate cues, and where the HTML report is."""
    from eive_audit.storage.catalog import query

    settings = _given(DEMO_FLAGS, given)
    classify = settings.get("task") == "classify"
    data = out / ("data-classify" if classify else "data")
    ann = data / "annotations" / "val.json"
    # settings first: a mistyped flag stops the demo with one line before any image is rendered
    config = _load_config(None, {**settings, "images": data / "images" / "val", "index" if classify else "coco": ann,
                                 "out": out})
    if not ann.is_file():
        if classify:
            from eive_audit.pipeline.sources.synthetic_classify import generate_classify as generate
        else:
            from eive_audit.pipeline.sources.synthetic import generate
        with showing_progress(), step("rendering", n_val) as advance:
            generate(data, 0, n_val, seed, progress=advance)
    _preflight(config)
    summary = _audit(config)
    fiftyone_dataset = config.review.fiftyone_dataset
    typer.echo(json.dumps(summary))
    worst = query(out, "SELECT instance_id, label_name, outcome, round(score, 3) AS score, "
                       "round(off_object_norm, 3) AS off_object_norm, round(verification_drop, 3) AS drop_when_blurred, "
                       "round(spurious_score, 3) AS spurious_score FROM instances WHERE run_id = ? "
                       "ORDER BY spurious_score DESC NULLS LAST, instance_id LIMIT 10", [summary["run_id"]])
    err.print(f"[bold]{'Predictions' if classify else 'Detections'} most likely right or wrong for the wrong reason"
              "[/bold] (spurious_score, read back through DuckDB):")
    _print_table(worst, "table", err)
    cues = query(out, "SELECT cue_id, support, round(mean_spurious_score, 3) AS mean_score, "
                      "round(verification_drop, 3) AS drop_when_blurred, confirmed, exemplar_ids[1:3] AS exemplars "
                      "FROM findings WHERE run_id = ? ORDER BY confirmed DESC, support DESC", [summary["run_id"]])
    what = "predictions" if classify else "detections"
    err.print(f"[bold]Candidate cues[/bold]: off-object peaks that many {what} of a class share; confirmed when "
              f"blurring the cue region costs half the {what}' score:")
    _print_table(cues, "table", err)
    err.print(f"HTML report: {summary['report']}")
    if fiftyone_dataset:
        from eive_audit.reports.views import explainer_view, open_command

        every_map = explainer_view(summary["run_id"], next(iter(config.explainers)))
        err.print(f"FiftyOne dataset: {fiftyone_dataset}; its maps, one sample per instance: "
                  f"{open_command(f'{fiftyone_dataset}-instances', every_map)}", soft_wrap=True, markup=False)


DEMO_FLAGS = [flag for flag in RUN_FLAGS if flag.path[0] not in ("images", "coco", "index", "out")]
app.command()(_with_flags(demo, DEMO_FLAGS))


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

    with showing_progress(), step("pushing to FiftyOne", None):
        pushed = push_run(store, run_id, dataset)
    typer.echo(json.dumps(pushed, default=_json_value))


@app.command()
def report(
    store: Path = typer.Option(..., help="store root"),
    out: Path = typer.Option(..., help="HTML file to write"),
    run: Optional[str] = typer.Option(None, help=_RUN_HELP),
) -> None:
    """Write a run's self-contained HTML report; prints its path."""
    run_id = _finished_run(store, run)
    from eive_audit.reports.html_report import write_report

    with showing_progress(), step("writing the report", None):
        written = write_report(store, run_id, out)
    typer.echo(str(written))


@app.command()
def diff(
    store: Path = typer.Option(..., help="store root"),
    run: Optional[str] = typer.Option(None, help=_RUN_HELP),
    base: Optional[str] = typer.Option(None, help="run to compare with; default: the previous finished run of the "
                                                  "same dataset (image root and annotation file)"),
    fail_on: Optional[str] = typer.Option(None, help=ReviewConfig.model_fields["fail_on"].description),
) -> None:
    """What changed between two runs of a store, as JSON: instances newly flagged or no longer flagged, candidate
    cues that appeared, grew, shrank or vanished, and each class's shift in mass_in_gt, insertion AUC,
    precision and recall."""
    conditions = _validated_part(lambda: ReviewConfig(fail_on=fail_on or []), "diff").fail_on
    run_id = _finished_run(store, run)
    from eive_audit.reports.diff import breached, previous_run, run_diff

    base_id = _finished_run(store, base) if base else previous_run(store, run_id)
    if base_id is None:
        _fail(f"run {run_id} has no earlier finished run of the same dataset in the store at {store}; pass --base RUN")
    changes = run_diff(store, base_id, run_id)
    typer.echo(json.dumps(changes, default=_json_value))
    held = breached(changes, conditions)
    if held:
        _fail(f"fail-on: {', '.join(held)} holds for run {run_id} against base run {base_id}", code=1)


@app.command("app")
def review_app(
    dataset: str = typer.Option(..., help="FiftyOne dataset (see `eive-audit push`)"),
    port: int = typer.Option(5151, min=1, max=65535),
    address: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 opens the App to the network"),
    view: Optional[str] = typer.Option(None, help="saved view to open on (the report names one per section)"),
) -> None:
    """Serve the FiftyOne App on a dataset until interrupted (Ctrl-C or SIGTERM)."""
    import signal

    from eive_audit.reports.fiftyone_push import launch_app

    # SIGTERM (a service manager, `kill`) stops the App as Ctrl-C does; otherwise Python dies without cleanup
    # and leaves FiftyOne's server and database processes running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        launch_app(dataset, port=port, address=address, wait=True, view=view)
    except ValueError as exc:  # FiftyOne raises ValueError for a dataset or a saved view that does not exist
        _fail(str(exc))


@app.command()
def schedule(
    config: Path = typer.Option(..., help="YAML file of AuditConfig fields (as `run --config`)"),
    cron: str = typer.Option(..., help='cron string: minute hour day-of-month month day-of-week, e.g. "0 2 * * *"'),
    name: Optional[str] = typer.Option(None, help="deployment name; default: the config file's name without .yaml"),
    fail_on: Optional[str] = typer.Option(None, help=f"{ReviewConfig.model_fields['fail_on'].description}; "
                                                     "overrides the config file's review.fail_on"),
) -> None:
    """Serve the audit as a Prefect deployment on a cron schedule (needs a Prefect server).

    Registers `audit/NAME` on the server at PREFECT_API_URL and runs its audits until interrupted; a run can
    also be started at once from the UI or with `prefect deployment run audit/NAME`. Each run publishes what
    changed since the previous run of its dataset as an artifact, and --fail-on fails its flow run on it."""
    from eive_audit.flows.schedule import NoServerError, serve_audit

    try:
        audit_config = _load_config(config, {"review": {"fail_on": fail_on}} if fail_on else {})
        _preflight(audit_config, data=False)  # the data may arrive before the first scheduled run
        serve_audit(audit_config, cron, name or config.stem)
    except (NoServerError, ValueError) as exc:
        _fail(str(exc))


def main() -> None:
    # Offline by design: no telemetry from Prefect's temporary server or FiftyOne unless the user asks.
    # (Its start-up limit and its lifetime are set where flows start it: eive_audit.flows.ephemeral.)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' tqdm bars: ours say it (showing_progress)
    _OWN_PROCESS.set()
    app()


if __name__ == "__main__":
    main()
