"""How a model's labels meet a dataset's categories; torch-free, so the CLI can check a run before it starts."""

from __future__ import annotations

import json
from pathlib import Path

from eive_audit.pipeline.models.families import OPEN_CLIP_CONFIG
from eive_audit.pipeline.models.locate import read_model_config, resolve_model_path


def label_to_category(model_labels: dict[int, str], categories: dict[int, str]) -> tuple[dict[int, int], str]:
    """Map model label index -> dataset category id: by name when every category has a model label, else by
    position (labels in order onto category ids in order) when no name matches at all (random-init models
    named LABEL_k). A partial match is refused: one stray class folder or a renamed class would otherwise
    shift every label of a by-position mapping, silently."""
    by_name = {name: idx for idx, name in model_labels.items()}
    named = [name for name in categories.values() if name in by_name]
    if len(named) == len(categories):
        return {by_name[name]: cat for cat, name in categories.items()}, "name"
    if named:
        missing = sorted(set(categories.values()) - set(named))
        raise ValueError(f"the model has no label named {', '.join(map(repr, missing[:5]))}"
                         f"{' ...' if len(missing) > 5 else ''} (its labels: {', '.join(list(by_name)[:10])})")
    if len(model_labels) < len(categories):
        raise ValueError(
            f"the model has {len(model_labels)} labels and none of the names match; the dataset has {len(categories)} categories"
        )
    return dict(zip(sorted(model_labels), sorted(categories))), "position"


def labels_of_model(model: str | Path) -> dict[int, str] | None:
    """A local model's labels (index -> name) from its config: transformers' `id2label`, timm's `label_names`,
    an OpenCLIP zero-shot directory's class names (`open_clip_config.json`); None for a hub id or a config
    without them."""
    clip = Path(resolve_model_path(model)) / OPEN_CLIP_CONFIG
    if clip.is_file():
        names = (json.loads(clip.read_text()).get("zero_shot") or {}).get("class_names")
        return dict(enumerate(map(str, names))) if names else None
    config = read_model_config(model)
    if config is None:
        return None
    if config.get("id2label"):
        return {int(index): str(name) for index, name in config["id2label"].items()}
    if config.get("label_names"):
        return dict(enumerate(map(str, config["label_names"])))
    return None
