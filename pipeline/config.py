"""`AuditConfig`: everything that decides an audit's results, and the hash that names the run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.models.detr import resolve_model_path


class AuditConfig(BaseModel):
    """One audit. Its canonical hash (`run_id`) decides resume: a shard already written under the same
    run id is skipped. `out`, `device` and the faithfulness batch size do not enter the hash (where
    results go and how they are batched on which device do not change what is computed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    images: Path = Field(description="image root (COCO) or image folder (no GT)")
    coco: Path | None = Field(None, description="COCO annotation json; None audits a plain image folder")
    out: Path = Field(description="store root: Parquet tables and catalog.duckdb")
    model: str = "default"
    explainers: tuple[str, ...] = ("eive",)
    fusion: str = "clhcf"
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
    device: str = "auto"

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
        content = self.model_dump(mode="json", exclude={"out", "device", "model", "faithfulness_batch_size"})
        content["images"] = str(self.images.resolve())
        content["coco"] = str(self.coco.resolve()) if self.coco else None
        content |= self._model_fingerprint()
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @property
    def run_id(self) -> str:
        return self.config_hash[:12]
