"""`AuditConfig`: everything that decides an audit, in nested parts, and the hash that names the run.

Every setting's default is written once, here: the CLI builds its flags from these fields (their defaults
and descriptions), config files are these fields as YAML, and the pipeline takes the parts as they are
(`config.faithfulness`, `config.findings`, `config.explainers["eive"]`). Importing this module loads
neither torch nor transformers, so the CLI answers `--help` and argument errors at once.

A field marked `affects_results=False` (where results go, how they are batched, what is done with them
afterwards) stays out of the run hash; every other field, the storage schema version, the model's
fingerprint and the annotation file's stamp enter it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator,
                      model_validator)

from eive_audit.pipeline.models.families import FAMILIES, VIT_FAMILIES
from eive_audit.pipeline.models.locate import resolve_model_path

_PATH_FIELDS = ("images", "coco", "index", "out")


def _device(value: str) -> str:
    """A torch device this project runs on, refused in words before torch would refuse it in a traceback."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")
    return value


Device = Annotated[str, AfterValidator(_device)]


def _unhashed(**kwargs: Any) -> Any:
    """A Field that does not change what is computed, so it stays out of the run hash."""
    return Field(json_schema_extra={"affects_results": False}, **kwargs)


class ConfigFileError(ValueError):
    """A YAML config that cannot become an AuditConfig: unreadable, not a mapping, or an unknown key."""


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExplainerSettings(_Part):
    """Parameters of an explainer that has none (raw attention, rollout, the gradient baselines)."""


class EiveSettings(ExplainerSettings):
    """EIVE (METHODS.md 1): decoder cross-attention of each instance's query, fused over layers."""

    fusion: Literal["product", "clhcf", "last", "mean", "max"] = Field(
        "product", description="layer fusion; product (the geometric mean) won EPG and insertion in the fusion ablation")
    track: bool = Field(True, description="follow each instance's representative query per layer (METHODS.md 1c)")
    temperature: float = Field(0.1, gt=0.0, description="CLHCF: temperature of the softmax over layer scores")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="CLHCF: weight of the consensus map against union x vote")
    rho: float = Field(0.2, gt=0.0, lt=1.0, description="CLHCF: a layer votes for its top-rho share of cells")
    eps: float = Field(1e-6, gt=0.0, description="floor under the logarithms of the product and CLHCF fusions")


class DriseSettings(ExplainerSettings):
    """D-RISE (METHODS.md 2): random masks, each weighted by how well the masked image still finds the instance."""

    n_masks: int = Field(1000, ge=1, description="random masks per image (paper: 5000)")
    grid_size: int = Field(16, ge=1, description="cells per side of a mask before upsampling")
    keep_prob: float = Field(0.5, gt=0.0, lt=1.0, description="chance that a mask keeps a cell")
    seed: int = Field(0, description="seed of the masks")
    batch_size: int = _unhashed(default=64, ge=1, description="masked images per forward")


class CdamSmoothSettings(ExplainerSettings):
    """Smooth CDAM (METHODS.md 3b): CDAM averaged over noisy copies of the tokens entering the last attention
    (the output of the last block's first LayerNorm, which CDAM attributes to)."""

    n_samples: int = Field(50, ge=1, description="noisy copies per target (the authors' m)")
    noise: float = Field(0.05, ge=0.0, description="noise sigma as a share of the value range of the image's "
                                                   "tokens entering the last attention")
    seed: int = Field(0, description="seed of the noise (the same draws for every image)")
    batch_size: int = _unhashed(default=64, ge=1, description="noisy copies per forward of the last block")


class CdamIntegratedSettings(ExplainerSettings):
    """Integrated CDAM (METHODS.md 3b): integrated gradients on the tokens entering the last attention, from a
    zero baseline: the tokens times the mean gradient at the tokens scaled by k/m, k = 1..m-1."""

    steps: int = Field(50, ge=2, description="m: the tokens are scaled by k/m for k = 1..m-1 (m = 2 is one step)")
    batch_size: int = _unhashed(default=64, ge=1, description="scaled copies per forward of the last block")


class IbaSettings(ExplainerSettings):
    """IBA (METHODS.md 3c, reconstructed from the abstract): every block scored on its own through the final
    norm and head, combined with that block's gradient-weighted attention, block maps fused."""

    fusion: Literal["mean", "product", "max"] = Field("mean", description="how the per-block maps are fused")
    first_block: int = Field(0, ge=0, description="blocks before this one are not scored")
    relevance: Literal["head", "gradient"] = Field("head", description="class-semantic relevance of a token: the "
                                                   "head on it alone (class probability), or gradient x token")


class ScoreCamSettings(ExplainerSettings):
    """Score-CAM (the grad-cam package): activation maps weighted by the class score of the image masked by each."""

    batch_size: int = _unhashed(default=64, ge=1, description="masked images per forward")


class AhaSettings(ExplainerSettings):
    """AHA (METHODS.md 3d): a decoder trained for the target model (`eive-audit train-explainer --method aha`)
    predicts each instance's map in one forward; optionally refined on the instance by a few steps of its loss."""

    model: Path | None = Field(None, json_schema_extra={"aliases": ["explainer-model"]},  # the spelling
                               description="the explainer directory train-explainer wrote; none: the one "
                                           "beside the audited model (MODEL/aha, as the shipped models have)")
    refine_steps: int = Field(0, ge=0, description="test-time refinement: optimisation steps of AHA's loss on each "
                                                   "instance's map (each: 2 x percentiles forwards and backwards)")
    refine_lr: float = Field(0.5, gt=0.0, description="Adam step size of the refinement, on the map logits")
    seed: int = Field(0, description="seed of the refinement's Gumbel noise")
    batch_size: int = _unhashed(default=8, ge=1, description="instances refined at once")

    @field_validator("model")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        """Absolute, so the run means the same explainer from any working directory (a scheduled run)."""
        return None if value is None else Path(value).expanduser().resolve()


# Explainers with parameters; every other registered explainer takes ExplainerSettings (none).
EXPLAINER_SETTINGS: dict[str, type[ExplainerSettings]] = {
    "eive": EiveSettings, "drise": DriseSettings, "cdam-smooth": CdamSmoothSettings,
    "cdam-integrated": CdamIntegratedSettings, "iba": IbaSettings, "score-cam": ScoreCamSettings, "aha": AhaSettings}
AHA_DIR = "aha"  # a model directory's own AHA explainer, found by `--explainer aha` without --aha-model


class FaithfulnessConfig(_Part):
    """Deletion / insertion AUC (METHODS.md 4). `standard`: fractions of the image's cells, score IoU * p,
    raw AUC. `odam` (our reading of ODAM's protocol, for comparison with its tables): noise fill; steps are
    fractions of the instance box's area; the score is the best same-class detection with IoU > 0.5, as a
    fraction of the intact image's score."""

    instances: str = Field("none", json_schema_extra={"flag": "faithfulness"},  # the CLI's --faithfulness
                           description="which instances get deletion / insertion AUC: none | all | flagged | sample:N")
    steps: int = Field(20, ge=1, description="perturbation steps of each curve")
    baseline: Literal["blur", "mean", "noise"] = Field("blur", description="what deleted cells are filled with")
    protocol: Literal["standard", "odam"] = Field("standard", description="standard, or odam (needs the noise baseline)")
    blur_sigma: float = Field(10.0, gt=0.0, description="of the blur baseline, in input pixels")
    seed: int = Field(0, description="seed of the noise baseline")
    batch_size: int = _unhashed(default=64, ge=1, description="perturbed images per forward")

    @field_validator("instances")
    @classmethod
    def _budget(cls, value: str) -> str:
        kind, _, n = value.partition(":")
        if value in ("none", "all", "flagged") or (kind == "sample" and n.isascii() and n.isdigit() and int(n) >= 1):
            return value
        raise ValueError(f"faithfulness must be none, all, flagged or sample:N (N >= 1), got {value!r}")

    @model_validator(mode="after")
    def _odam_fills_with_noise(self) -> "FaithfulnessConfig":
        if self.protocol == "odam" and self.baseline != "noise":
            raise ValueError("faithfulness protocol odam fills with noise: set the faithfulness baseline to noise")
        return self


class FindingsConfig(_Part):
    """Flags, candidate cues and their verification (pipeline.findings); defaults chosen on the tuning
    generators of the planted-cue benchmark suite (benchmarks/spurious_recovery.py)."""

    enabled: bool = Field(True, description="flag spurious attention, cluster candidate cues, verify them")
    reach_cells: int = Field(1, ge=0, description="cells around the ones an object's box touches that still count "
                             "as on the object (a cell's receptive field), for the normalised off-object share")
    off_object: float = Field(0.4, gt=0.0, le=1.0, description="flag a tp / dup / fn with at least this "
                              "normalised map share off its object")
    background: float = Field(0.5, gt=0.0, le=1.0,
                              description="flag an fp with at least this normalised map share off every GT box")
    min_support: int = Field(5, ge=2, description="flagged instances a cluster needs to be a candidate cue")
    forward_budget: float = Field(2.0, ge=0.0, description="perturbed forwards per audited image that the "
                                  "findings step may spend (each costs about what the audit's forward of an image "
                                  "cost): verification takes one per image, the images of the most suspicious "
                                  "instances first, and localisation of the largest confirmed drops the rest; what "
                                  "does not fit is counted as skipped")
    context_cells: int = Field(16, ge=1, description="surroundings of each box that verification and localisation "
                               "blur, in cells; 16 reaches across the shipped model's 16 x 16 grid, so everything "
                               "but the objects (a 2-cell ring missed cues 16-40 px from their object)")
    blur_sigma: float = Field(10.0, gt=0.0, description="of the blur that fills a verified region, in input pixels")
    confirm_drop: float = Field(0.5, ge=0.0, le=1.0, description="relative score drop that confirms reliance")
    window_cells: int = Field(2, ge=1, description="side of the window localisation slides over the surroundings")
    feature_dims: int = Field(8, ge=1, description="PCA components of the backbone feature kept for clustering")
    exemplars: int = Field(6, ge=1, description="exemplar crops kept per candidate cue")


# What a run's diff against the previous run of its dataset counts (reports.diff), by the name a --fail-on
# condition uses: the diff's `summary` has exactly these keys.
DIFF_METRICS: dict[str, str] = {
    "newly_flagged": "instances flagged now and not in the base run (or new and flagged)",
    "no_longer_flagged": "instances flagged in the base run and not now (or gone)",
    "new_cues": "candidate cues with no match in the base run",
    "new_confirmed_cues": "confirmed cues that were absent or unconfirmed in the base run",
    "grown_cues": "cues matched in the base run whose support grew",
    "vanished_cues": "cues of the base run with no match now",
    "mass_in_gt_drop": "largest fall of a class's mean mass_in_gt (correct detections), 0 if none fell",
    "insertion_auc_drop": "largest fall of a class's mean insertion AUC, 0 if none fell",
    "precision_drop": "largest fall of a class's precision, 0 if none fell",
    "recall_drop": "largest fall of a class's recall, 0 if none fell",
}
_CONDITION = re.compile(r"\s*([a-z_]+)\s*(>=|<=|==|!=|>|<)\s*(-?[0-9]+(?:\.[0-9]*)?)\s*")


class ReviewConfig(_Part):
    """What is done with a finished run: neither changes its results."""

    report: bool = _unhashed(default=True, description="write STORE/reports/<run_id>.html when the run finishes")
    fiftyone_dataset: str | None = _unhashed(default=None, min_length=1,
                                             description="push the finished run to this FiftyOne dataset")
    fail_on: list[str] = _unhashed(
        default_factory=list,
        description="conditions on the diff against the previous run of the same dataset that fail the run "
                    "(exit 1; a failed Prefect flow run, so automations can alert), comma-separated "
                    f"METRIC OP NUMBER, e.g. new_confirmed_cues>0; metrics: {', '.join(DIFF_METRICS)}")

    @field_validator("fail_on", mode="before")
    @classmethod
    def _conditions(cls, value: Any) -> list[str]:
        """Each condition parsed now, so a typo is named before the run, not when its diff is read."""
        items = [part for part in value.split(",") if part.strip()] if isinstance(value, str) else list(value)
        for item in items:
            match = _CONDITION.fullmatch(str(item))
            if match is None:
                raise ValueError(f"bad condition {item!r}: write METRIC OP NUMBER, e.g. new_confirmed_cues>0")
            if match[1] not in DIFF_METRICS:
                raise ValueError(f"unknown metric {match[1]!r} in {item!r}; {did_you_mean(match[1], DIFF_METRICS)}"
                                 f"metrics: {', '.join(DIFF_METRICS)}")
        return [str(item).replace(" ", "") for item in items]


def parse_condition(condition: str) -> tuple[str, str, float]:
    """(metric, operator, threshold) of a validated `fail_on` condition."""
    match = _CONDITION.fullmatch(condition)
    if match is None:
        raise ValueError(f"bad condition {condition!r}")
    return match[1], match[2], float(match[3])


def did_you_mean(name: str, choices: Any) -> str:
    """"did you mean X? " for the closest of `choices` to a mistyped `name`, or ""."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


# The outcome of an instances row, and the detection outcome whose part it plays in the flags, findings and
# review: a classifier's instances are its predicted class (correct or wrong) and, when wrong, the true class
# (missed: "why was it not that class", as a detector's fn asks "why was it missed").
OUTCOME_ROLES: dict[str, str] = {"tp": "tp", "fp": "fp", "dup": "dup", "crowd": "crowd", "fn": "fn", "det": "det",
                                 "correct": "tp", "wrong": "fp", "missed": "fn"}


def playing(*roles: str) -> tuple[str, ...]:
    """The outcomes that play any of the detection `roles` (`playing("fn")` is ("fn", "missed"))."""
    return tuple(outcome for outcome, role in OUTCOME_ROLES.items() if role in roles)


def sql_outcome_in(*roles: str, column: str = "outcome") -> str:
    """SQL: `column` is an outcome playing one of `roles`."""
    return f"{column} IN ({', '.join(repr(o) for o in playing(*roles))})"


CLASSIFY_EXPLAINERS = ["legrad"]  # a classification audit's default explainers (a detection audit's: eive)


class AuditConfig(_Part):
    """One audit. Its canonical hash (`run_id`) decides resume: a shard already written under the same
    run id is skipped."""

    task: Literal["detect", "classify"] = Field(
        "detect", description="detect: a DETR-family detector, instances are its detections and misses; classify: "
                              "a ViT classifier, instances are each image's predicted class and, when wrong, its "
                              "true class")
    images: Path = _unhashed(description="image root (with --coco or --index), a plain image folder, or for "
                                         "classify without --index an ImageFolder tree IMAGES/<class>/<image>")
    coco: Path | None = _unhashed(default=None, description="COCO annotation json; none audits a plain image folder")
    index: Path | None = _unhashed(default=None, description="classification index (json or csv of file, label and "
                                                              "optional object boxes) for --task classify")
    out: Path = _unhashed(description="store root: Parquet tables and catalog.duckdb")
    model: str = _unhashed(default="default", description="model directory, hub id, or a shipped model: `default` "
                                                          "(the detector; with --task classify, `default-vit`)")
    # A union, so the JSON schema (which a Prefect server checks a deployment's parameters against) admits each
    # explainer's parameters; `_explainer_settings` picks the class by name.
    explainers: dict[str, SerializeAsAny[EiveSettings | DriseSettings | CdamSmoothSettings | CdamIntegratedSettings
                                         | IbaSettings | ScoreCamSettings | AhaSettings | ExplainerSettings]] = Field(
        default_factory=lambda: {"eive": EiveSettings()},
        description=f"explainers to run, in order, each with its parameters; with --task classify "
                    f"{','.join(CLASSIFY_EXPLAINERS)} by default")
    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="keep detections scoring at least this")
    max_detections: int = Field(100, ge=1, description="detections kept per image, best first")
    batch_size: int = Field(8, ge=1, description="images per forward")
    shard_size: int = Field(64, ge=1, description="images per shard (the unit of resume)")
    device: Device = _unhashed(default="auto", description="auto | cpu | cuda | cuda:N")
    runner: Literal["threads", "dask", "ray"] = _unhashed(
        default="threads", description="task runner the shards are submitted to: threads (a pool in this process), "
                                       "dask (a LocalCluster of worker processes, or --dask-address), ray (local "
                                       "Ray, or --ray-address)")
    workers: int | None = _unhashed(
        default=None, ge=1, description="shards audited at once (threads or local worker processes), each worker "
                                        "with its own model; default 1, or one per visible GPU with --device cuda")
    decode_workers: int | None = _unhashed(
        default=None, ge=0, description="threads decoding images ahead of the forward in each worker; default "
                                        "min(4, CPUs), 0 decodes in the worker's own thread")
    torch_threads: int | None = _unhashed(
        default=None, ge=1, description="CPU threads of each worker's torch; default torch's own (all cores here, 1 in "
                                        "a Dask or Ray worker, which set OMP_NUM_THREADS=1). CPU sums depend on it in "
                                        "the 7th digit: runs compared bit for bit use one value")
    dask_address: str | None = _unhashed(
        default=None, min_length=1, description="scheduler of an existing Dask cluster (tcp://host:8786) for "
                                                "--runner dask; none starts a LocalCluster")
    ray_address: str | None = _unhashed(
        default=None, min_length=1, description="an existing Ray cluster (ray://host:10001 or auto) for --runner "
                                                "ray; none starts Ray on this machine")
    max_error_rate: float | None = _unhashed(
        default=None, ge=0.0, le=1.0, description="exit 1 when more than this share of the images failed (their "
                                                  "errors rows are kept); a run where every image failed always does")
    faithfulness: FaithfulnessConfig = Field(default_factory=FaithfulnessConfig)
    findings: FindingsConfig = Field(default_factory=FindingsConfig)
    review: ReviewConfig = _unhashed(default_factory=ReviewConfig)

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_task(cls, data: Any) -> Any:
        """A classification audit takes, unless told otherwise, the shipped ViT (a detection audit, the shipped
        detector) and LeGrad (EIVE reads a detector's decoder, which a ViT does not have)."""
        if not isinstance(data, dict) or data.get("task") != "classify":
            return data
        if data.get("model") in (None, "default"):
            data = {**data, "model": "default-vit"}
        if data.get("explainers") is None:
            data = {**data, "explainers": CLASSIFY_EXPLAINERS}
        return data

    @model_validator(mode="after")
    def _annotations_fit_task(self) -> "AuditConfig":
        """A COCO json is a detection dataset and an index a classification one: the wrong one is refused."""
        if self.task == "classify" and self.coco is not None:
            raise ValueError("coco annotations are for task detect; a classification audit reads --index")
        if self.task == "detect" and self.index is not None:
            raise ValueError("index is for task classify (--task classify); a detection audit reads --coco")
        return self

    @model_validator(mode="after")
    def _address_fits_runner(self) -> "AuditConfig":
        """A cluster address is for its own runner: `--dask-address` with `--runner threads` would silently run
        here, so it is refused."""
        for runner in ("dask", "ray"):
            if getattr(self, f"{runner}_address") and self.runner != runner:
                raise ValueError(f"{runner}_address is for runner {runner}, but runner is {self.runner}")
        return self

    @model_validator(mode="after")
    def _explainer_models(self) -> "AuditConfig":
        """A learned explainer without its directory takes the audited model's own (MODEL/aha) where it has
        one, so `--explainer aha` alone runs a shipped model's shipped explainer. Without one it stays unset
        (a directory may still be merged in: `--aha-model` over a config file) and `missing_explainer_model`
        says so before any image is read."""
        beside = Path(resolve_model_path(self.model)) / AHA_DIR
        found = {name: s.model_copy(update={"model": beside.resolve()}) for name, s in self.explainers.items()
                 if isinstance(s, AhaSettings) and s.model is None and beside.is_dir()}
        if found:  # frozen, and an after-validator must return self: the one field is set in place
            object.__setattr__(self, "explainers", {**self.explainers, **found})
        return self

    def missing_explainer_model(self) -> str | None:
        """The one-line refusal of a learned explainer that has no directory, or None."""
        if not any(isinstance(s, AhaSettings) and s.model is None for s in self.explainers.values()):
            return None
        return (f"aha needs an explainer trained for {self.model}: pass --aha-model DIR (written by "
                f"`eive-audit train-explainer --method aha --model {self.model}`); "
                f"{Path(resolve_model_path(self.model)) / AHA_DIR} has none")

    @field_validator("explainers", mode="before")
    @classmethod
    def _explainer_settings(cls, value: Any) -> dict[str, ExplainerSettings]:
        """Names (a list, or a comma-separated string) or a mapping name -> parameters, each parameter set
        validated by its explainer's settings class."""
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            if len(set(value)) != len(value):
                raise ValueError(f"explainers must be distinct, got {', '.join(map(str, value))}")
            value = {name: {} for name in value}
        if not isinstance(value, dict) or not value:
            raise ValueError("explainers must name at least one explainer")
        settings = {}
        for name, params in value.items():
            kind = EXPLAINER_SETTINGS.get(str(name), ExplainerSettings)
            try:
                settings[str(name)] = params if isinstance(params, kind) else kind(**(params or {}))
            except ValidationError as exc:  # re-raised with the explainer's name in each error's location
                raise ValidationError.from_exception_data(exc.title, [  # type: ignore[misc]
                    {"type": e["type"], "loc": (str(name), *e["loc"]), "input": e["input"], "ctx": e.get("ctx", {})}
                    for e in exc.errors()]) from None
        return settings

    def _model_fingerprint(self) -> dict[str, object]:
        """Path plus weight-file sizes and mtimes, so retraining a model in place starts a new run."""
        path = Path(resolve_model_path(self.model))
        if not path.is_dir():
            return {"model": self.model}
        return {"model": str(path.resolve()), "files": _files_stamp(path)["files"]}

    @property
    def config_hash(self) -> str:
        from eive_audit.storage.schema import SCHEMA_VERSION  # the one edge pipeline -> storage: a constant

        content: dict[str, Any] = {"settings": _results_fields(self), "schema_version": SCHEMA_VERSION,
                                   "images": str(self.images.resolve()),
                                   "coco": str(self.coco.resolve()) if self.coco else None}
        if self.index is not None:  # only then, so a detection run keeps the id it had before indexes existed
            content["index"] = str(self.index.resolve())
        for name in ("coco", "index"):
            annotations = getattr(self, name)
            if annotations is not None and annotations.is_file():  # annotations edited in place start a new run
                stat = annotations.stat()
                content[f"{name}_file"] = (stat.st_size, stat.st_mtime_ns)
        content |= self._model_fingerprint()
        learned = {name: _files_stamp(Path(s.model)) for name, s in self.explainers.items()
                   if isinstance(s, AhaSettings) and s.model is not None}
        if learned:  # only then, so a run without a learned explainer keeps its id
            content["explainer_models"] = learned
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @property
    def run_id(self) -> str:
        return self.config_hash[:12]

    @property
    def decode_threads(self) -> int:
        """`decode_workers`, or by default min(4, CPUs): enough to keep a GPU fed, few enough to leave the
        forward its cores on a small machine."""
        return self.decode_workers if self.decode_workers is not None else min(4, os.cpu_count() or 1)

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> "AuditConfig":
        """The config a YAML file describes (keys = field names, parts as nested mappings), with `overrides`
        (e.g. the flags given on a command line) merged over the file part by part. Relative paths in the
        file resolve against the file's folder, so a config means the same run from any working directory;
        `model` does too when that folder holds it (otherwise it is `default` or a hub id). Unknown keys
        raise ConfigFileError naming them."""
        path = Path(path).resolve()
        try:
            settings = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigFileError(f"cannot read config {path}: {exc}") from exc
        settings = {} if settings is None else settings
        if not isinstance(settings, dict):
            raise ConfigFileError(f"config {path} must be a mapping of AuditConfig fields, not {type(settings).__name__}")
        unknown = sorted(str(key) for key in set(settings) - set(cls.model_fields))
        if unknown:
            raise ConfigFileError(f"unknown key {', '.join(map(repr, unknown))} in {path}; "
                                  f"valid keys: {', '.join(cls.model_fields)}")
        return cls(**merge_settings(_resolve_relative(settings, path.parent), overrides))

    def to_yaml(self, path: Path) -> Path:
        """Write the config as YAML that `from_yaml` reads back to an equal config, wherever the file goes
        (paths are written absolute). Returns `path`."""
        content = self.absolute().model_dump(mode="json")
        Path(path).write_text(yaml.safe_dump(content, sort_keys=False))
        return Path(path)

    def absolute(self) -> "AuditConfig":
        """The same config with absolute paths: what a process with another working directory (a scheduled
        run) needs. Same run id."""
        return self.model_copy(update={name: Path(value).resolve() for name in _PATH_FIELDS
                                       if (value := getattr(self, name)) is not None})


class TrainConfig(_Part):
    """Everything that decides a training run (pipeline.train); saved beside the model as
    `training_config.json`. A checkpoint resumes only under the same settings, except those in
    `pipeline.train.RESUMABLE_CHANGES`."""

    task: Literal["detect", "classify"] = Field("detect", description="detect: a DETR-family detector on a COCO "
                                                "json; classify: a ViT classifier on a classification index")
    coco: Path | None = Field(None, description="COCO annotation json of the training split (detect)")
    index: Path | None = Field(None, description="classification index (json or csv) of the training split "
                                                 "(classify); none reads an ImageFolder tree IMAGES/<class>/<image>")
    images: Path = Field(description="image root of the training split")
    out: Path = Field(description="model directory to write (its checkpoint/ folder resumes an interrupted run)")
    family: str | None = Field(None, description="architecture when training from scratch; default "
                                                 "conditional-detr-small (detect) or vit-synth (classify)")
    init: Path | None = Field(None, description="fine-tune this model directory (or `default`) instead of a random "
                                                "init; onto other category names, with a class head relabelled to "
                                                "the dataset's categories")
    steps: int = Field(6000, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="images per step")
    lr: float = Field(5e-4, gt=0.0, description="AdamW learning rate after warm-up")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay")
    clip_norm: float = Field(1.0, gt=0.0, description="gradient norm clip")
    warmup_steps: int = Field(200, ge=0, description="steps of linear learning-rate warm-up")
    lr_drop_fraction: float = Field(0.8, gt=0.0, le=1.0,
                                    description="share of the steps after which the learning rate drops tenfold")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    log_every: int = Field(20, ge=1, description="steps between progress lines (step, losses, elapsed time, rate) "
                                                 "when stderr is not a terminal; a terminal gets a progress bar")
    hflip: bool = Field(True, description="random horizontal flips (seeded per step and image)")
    seed: int = Field(0, description="seed of the initialisation, data order and flips")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; none: torch's default")
    aajts: bool = Field(False, description="attention-aware joint training (METHODS.md 1d)")
    lambda_in: float = Field(0.5, ge=0.0, description="AAJTS concentration weight")
    lambda_stab: float = Field(0.1, ge=0.0, description="AAJTS stability weight")

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        if value is not None and value not in FAMILIES and value not in VIT_FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)} (detect) or {', '.join(VIT_FAMILIES)} "
                             f"(classify), got {value!r}")
        return value

    @model_validator(mode="after")
    def _fits_task(self) -> "TrainConfig":
        if self.task == "detect":
            if self.coco is None:
                raise ValueError("training a detector needs the COCO annotation json (coco)")
            if self.family is not None and self.family not in FAMILIES:
                raise ValueError(f"family {self.family} is a classifier: train it with task classify")
        else:
            if self.aajts:
                raise ValueError("aajts trains a detector's cross-attention: it is for task detect")
            if self.coco is not None:
                raise ValueError("a classifier trains on a classification index (index) or an ImageFolder tree, "
                                 "not a COCO json")
            if self.family is not None and self.family not in VIT_FAMILIES:
                raise ValueError(f"family must be one of {', '.join(VIT_FAMILIES)} for task classify, "
                                 f"got {self.family!r}")
        return self

    @property
    def recipe(self) -> str:
        """The family trained from scratch: `family`, or the task's small default."""
        return self.family or ("conditional-detr-small" if self.task == "detect" else "vit-synth")


class ExplainerTrainConfig(_Part):
    """Everything that decides the training of a learned explainer (`eive-audit train-explainer`,
    pipeline.train_explainer); saved in the explainer directory. Resumes under the rules of TrainConfig
    (`pipeline.train.RESUMABLE_CHANGES`). The defaults of the loss are METHODS.md 3d's."""

    method: Literal["aha"] = Field("aha", description="the learned explainer: aha (METHODS.md 3d)")
    model: str = Field(description="the frozen target model: a directory, a hub id, default (the shipped detector) "
                                   "or default-vit (the shipped ViT)")
    images: Path = Field(description="image root of the training images")
    coco: Path | None = Field(None, description="COCO json over the images (a detector; none: every image in the "
                                                "folder); a detector is explained on its own detections")
    index: Path | None = Field(None, description="classification index over the images (a classifier; none: an "
                                                 "ImageFolder tree); a wrong prediction's true class is explained too")
    out: Path = Field(description="explainer directory to write (its checkpoint/ folder resumes an interrupted run)")
    steps: int = Field(600, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="images per step")
    instances: int = Field(3, ge=1, description="a detector's instances explained per image and step: its "
                                                "detections above score_threshold, best first, at least its best query")
    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="a detection counts from this score")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate after warm-up")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay")
    clip_norm: float = Field(1.0, gt=0.0, description="gradient norm clip")
    warmup_steps: int = Field(20, ge=0, description="steps of linear learning-rate warm-up")
    lr_drop_fraction: float = Field(0.8, gt=0.0, le=1.0,
                                    description="share of the steps after which the learning rate drops tenfold")
    grid_min: int = Field(7, ge=2, description="smallest side of the random pooling grid a step sorts")
    grid_max: int = Field(28, ge=2, description="largest side of the random pooling grid")
    tau_start: float = Field(1.0, gt=0.0, description="Gumbel-Sinkhorn temperature at the first step")
    tau_end: float = Field(0.3, gt=0.0, description="temperature at the last step (annealed geometrically)")
    sinkhorn_iterations: int = Field(30, ge=1, description="Sinkhorn normalisations per sort")
    percentiles: int = Field(16, ge=2, description="soft deletion steps of each curve, fractions 0 to 1")
    peak_weight: float = Field(0.0025, ge=0.0, description="weight of the peak penalty")
    reference: Literal["blur", "mean", "noise"] = Field("blur", description="what deleted pixels are blended "
                                                        "toward: the faithfulness scores' own baselines")
    blur_sigma: float = Field(10.0, gt=0.0, description="of the blur reference, in input pixels")
    hidden: int = Field(64, ge=4, description="channels of the decoder")
    blocks: list[int] | None = Field(None, description="a ViT's blocks whose patch tokens the decoder reads; none: "
                                                       "the middle and the last")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    log_every: int = Field(10, ge=1, description="steps between progress lines when stderr is not a terminal")
    seed: int = Field(0, description="seed of the initialisation, data order, grids and Gumbel noise")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; none: torch's default")

    @model_validator(mode="after")
    def _ranges(self) -> "ExplainerTrainConfig":
        if self.grid_min > self.grid_max:
            raise ValueError(f"grid_min {self.grid_min} is above grid_max {self.grid_max}")
        if self.coco is not None and self.index is not None:
            raise ValueError("coco is a detector's data and index a classifier's: give the one of the model")
        return self


def _files_stamp(path: Path) -> dict[str, Any]:
    """A directory's files by name, size and mtime: what a retrained model or explainer changes."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return {"path": str(path.resolve()), "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}


def _results_fields(part: BaseModel) -> dict[str, Any]:
    """The fields of `part` that change results, recursively, as JSON values."""
    content: dict[str, Any] = {}
    for name, info in type(part).model_fields.items():
        if (info.json_schema_extra or {}).get("affects_results") is False:  # type: ignore[union-attr]
            continue
        value = getattr(part, name)
        if isinstance(value, BaseModel):
            content[name] = _results_fields(value)
        elif isinstance(value, dict):
            content[name] = {k: _results_fields(v) if isinstance(v, BaseModel) else v for k, v in value.items()}
        else:
            content[name] = json.loads(json.dumps(value, default=str))
    return content


def merge_settings(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` over `base`, mapping by mapping: a flag for one part (or one explainer's parameter)
    replaces that value only. Explainer names given as a list or string choose the explainers; their
    parameters from `base` are kept."""
    merged = dict(base)
    for key, value in overrides.items():
        old = merged.get(key)
        if key == "explainers" and isinstance(value, (list, tuple, str)) and isinstance(old, dict):
            names = value.split(",") if isinstance(value, str) else value
            merged[key] = {name: old.get(name, {}) for name in names}
        elif isinstance(value, dict) and isinstance(old, dict):
            merged[key] = merge_settings(old, value)
        else:
            merged[key] = value
    return merged


def _resolve_relative(settings: dict[str, Any], base: Path) -> dict[str, Any]:
    """Settings with relative path values made absolute against `base` (the YAML file's folder)."""
    resolved = dict(settings)
    for name in _PATH_FIELDS:
        if isinstance(resolved.get(name), str):
            resolved[name] = (base / Path(resolved[name]).expanduser()).resolve()
    model = resolved.get("model")
    if isinstance(model, str) and model != "default" and (base / model).exists():
        resolved["model"] = str((base / model).resolve())
    explainers = resolved.get("explainers")
    if isinstance(explainers, dict):  # a learned explainer's directory, as the model's
        resolved["explainers"] = {name: {**params, "model": str((base / params["model"]).resolve())}
                                  if isinstance(params, dict) and isinstance(params.get("model"), str) else params
                                  for name, params in explainers.items()}
    return resolved
