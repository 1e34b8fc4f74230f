"""`AuditConfig`: everything that decides an audit's results, and the hash that names the run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from eive_audit.pipeline.models.detr import resolve_model_path


# Fields that say where results go, how they are batched on which device, and what is done with them
# afterwards: none of them changes what is computed, so none enters the run hash (`model` enters as its
# fingerprint instead of its name).
_NOT_HASHED = frozenset({"out", "device", "model", "faithfulness_batch_size", "fiftyone_dataset", "report"})
_PATH_FIELDS = ("images", "coco", "out")


class ConfigFileError(ValueError):
    """A YAML config that cannot become an AuditConfig: unreadable, not a mapping, or an unknown key."""


class AuditConfig(BaseModel):
    """One audit. Its canonical hash (`run_id`) decides resume: a shard already written under the same
    run id is skipped. `out`, `device`, the faithfulness batch size and the review outputs (HTML report,
    FiftyOne push) do not enter the hash (where results go and how they are batched on which device do
    not change what is computed). `model` enters through its fingerprint, not its name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    images: Path = Field(description="image root (COCO) or image folder (no GT)")
    coco: Path | None = Field(None, description="COCO annotation json; None audits a plain image folder")
    out: Path = Field(description="store root: Parquet tables and catalog.duckdb")
    model: str = "default"
    explainers: tuple[str, ...] = ("eive",)
    fusion: str = "product"  # explainers.eive.DEFAULT_FUSION, the fusion ablation's winner
    score_threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_detections: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(64, ge=1)
    faithfulness: str = Field("none", pattern=r"^(none|all|flagged|sample:[1-9][0-9]*)$",
                              description="which instances get deletion / insertion AUC")
    faithfulness_steps: int = Field(20, ge=1)
    faithfulness_baseline: str = Field("blur", pattern=r"^(blur|mean|noise)$")
    faithfulness_protocol: str = Field("standard", pattern=r"^(standard|odam)$",
                                       description="odam: ODAM's steps and score, noise fill (see metrics.faithfulness)")
    faithfulness_batch_size: int = Field(64, ge=1)
    flag_mass_in_gt: float = Field(0.3, ge=0.0, le=1.0,
                                   description="`flagged` budget: correct detections with less mass on their GT")
    findings: bool = Field(True, description="flag spurious attention, cluster candidate cues, verify them")
    spurious_off_object: float = Field(0.4, ge=0.0, le=1.0,
                                       description="flag a tp / dup / fn with at least this map share off its object")
    spurious_background: float = Field(0.5, ge=0.0, le=1.0,
                                       description="flag an fp with at least this map share off every GT box")
    cue_min_support: int = Field(5, ge=2, description="flagged instances a cluster needs to be a candidate cue")
    verify_budget: int = Field(5000, ge=0,
                               description="instances re-scored with their surroundings blurred (flagged first)")
    localise_budget: int = Field(15000, ge=0, description="forwards (one per window) spent localising confirmed "
                                 "reliance, largest drops first")
    drise_masks: int = Field(1000, ge=1, description="random masks per image of the drise explainer (paper: 5000)")
    device: str = "auto"
    fiftyone_dataset: str | None = Field(None, min_length=1,
                                         description="push the finished run to this FiftyOne dataset; None: no push")
    report: bool = Field(True, description="write STORE/reports/<run_id>.html when the run finishes")

    @field_validator("explainers")
    @classmethod
    def _distinct_explainers(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if not names or len(set(names)) != len(names):
            raise ValueError(f"explainers must be distinct and at least one, got {names}")
        return names

    def _model_fingerprint(self) -> dict[str, object]:
        """Path plus weight-file sizes and mtimes, so retraining a model in place starts a new run."""
        path = Path(resolve_model_path(self.model))
        if not path.is_dir():
            return {"model": self.model}
        files = sorted(p for p in path.iterdir() if p.is_file())
        return {"model": str(path.resolve()), "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}

    @model_validator(mode="after")
    def _odam_fills_with_noise(self) -> "AuditConfig":
        if self.faithfulness_protocol == "odam" and self.faithfulness_baseline != "noise":
            raise ValueError("--faithfulness-protocol odam fills with noise: add --faithfulness-baseline noise")
        return self

    @property
    def config_hash(self) -> str:
        content = self.model_dump(mode="json", exclude=set(_NOT_HASHED))
        content["images"] = str(self.images.resolve())
        content["coco"] = str(self.coco.resolve()) if self.coco else None
        if self.coco is not None and self.coco.is_file():  # annotations edited in place start a new run
            stat = self.coco.stat()
            content["coco_file"] = (stat.st_size, stat.st_mtime_ns)
        content |= self._model_fingerprint()
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @property
    def run_id(self) -> str:
        return self.config_hash[:12]

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> "AuditConfig":
        """The config a YAML file describes (keys = field names), with `overrides` (e.g. the flags given on a
        command line) winning over the file. Relative paths in the file resolve against the file's folder,
        so a config means the same run from any working directory; `model` does too when that folder holds
        it (otherwise it is `default` or a hub id). Unknown keys raise ConfigFileError naming them."""
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
        return cls(**(_resolve_relative(settings, path.parent) | overrides))

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


def _resolve_relative(settings: dict[str, Any], base: Path) -> dict[str, Any]:
    """Settings with relative path values made absolute against `base` (the YAML file's folder)."""
    resolved = dict(settings)
    for name in _PATH_FIELDS:
        if isinstance(resolved.get(name), str):
            resolved[name] = (base / Path(resolved[name]).expanduser()).resolve()
    model = resolved.get("model")
    if isinstance(model, str) and model != "default" and (base / model).exists():
        resolved["model"] = str((base / model).resolve())
    return resolved
