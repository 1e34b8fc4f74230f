"""One entry to load any supported model: a DETR-family detector or a ViT classifier, told apart by its
checkpoint. `task_of_model` reads only config files (no torch), so the CLI can pick the task's flow and
check explainers before anything heavy loads; `load_model` imports the adapter it needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from eive_audit.pipeline.models.families import family_of_config, family_of_model
from eive_audit.pipeline.models.locate import ModelLoadError, resolve_model_path

if TYPE_CHECKING:
    import torch

    from eive_audit.pipeline.models.detr import DetrAdapter
    from eive_audit.pipeline.models.vit import ViTAdapter


def task_of_model(name: str | Path) -> Literal["detect", "classify"]:
    """The model's task, "detect" or "classify": a local directory's from its config.json (or
    open_clip_config.json), a hub id's from the config.json on the hub (offline: in the cache). ModelLoadError
    (a ValueError) when it cannot be read or names an unsupported model type."""
    family = family_of_model(name)
    if family is None:
        family = family_of_config(_hub_config(resolve_model_path(name)))
    return "classify" if family.task == "classify" else "detect"


def _hub_config(model_id: str) -> dict:
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model_id, "config.json")).read_text())
    except Exception as exc:  # no such repo or file, or offline without a cached copy
        raise ModelLoadError(f"cannot read the config.json of hub model {model_id}: {exc}") from exc


def load_model(name: str | Path, device: str | torch.device = "auto") -> DetrAdapter | ViTAdapter:
    """The adapter of the model's task: `DetrAdapter.load` (which picks a deformable subclass itself) or
    `ViTAdapter.load`."""
    if task_of_model(name) == "classify":
        from eive_audit.pipeline.models.vit import ViTAdapter

        return ViTAdapter.load(name, device)
    from eive_audit.pipeline.models.detr import DetrAdapter

    return DetrAdapter.load(name, device)
