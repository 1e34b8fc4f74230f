"""How a model's labels meet a dataset's categories; torch-free, so the CLI can check a run before it starts."""

from __future__ import annotations

from pathlib import Path

from eive_audit.pipeline.models.locate import read_model_config


def label_to_category(model_labels: dict[int, str], categories: dict[int, str]) -> tuple[dict[int, int], str]:
    """Map model label index -> dataset category id: by name when every category has a model label,
    else by position (labels in order onto category ids in order, for random-init models named LABEL_k)."""
    by_name = {name: idx for idx, name in model_labels.items()}
    if all(name in by_name for name in categories.values()):
        return {by_name[name]: cat for cat, name in categories.items()}, "name"
    if len(model_labels) < len(categories):
        raise ValueError(
            f"the model has {len(model_labels)} labels and none of the names match; the dataset has {len(categories)} categories"
        )
    return dict(zip(sorted(model_labels), sorted(categories))), "position"


def labels_of_model(model: str | Path) -> dict[int, str] | None:
    """A local model's labels (index -> name) from its config.json; None for a hub id or a config without them."""
    config = read_model_config(model)
    if config is None or not config.get("id2label"):
        return None
    return {int(index): str(name) for index, name in config["id2label"].items()}
