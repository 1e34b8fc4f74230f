"""Where a model named on the command line lives, and its config.json; no torch here, so the config and the
CLI stay light and can check a model before anything heavy loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"
# The models shipped in the package, by the name the command line gives them: the small detector and the tiny ViT
# classifier, each trained by the project's own `eive-audit train` on synthetic planted-cue data (see their cards).
SHIPPED_MODELS = {"default": DEFAULT_MODEL_DIR, "default-vit": Path(__file__).parent / "default_vit"}


class ModelLoadError(ValueError):
    """A model directory (or hub id) that cannot be loaded; the message says why."""


def resolve_model_path(name: str | Path) -> str:
    """`default` and `default-vit` name the shipped models; anything else is a local directory or a hub id."""
    return str(SHIPPED_MODELS.get(str(name), name))


def read_model_config(name: str | Path) -> dict[str, Any] | None:
    """The parsed config.json of a local model directory, or None for a hub id (`owner/name`, read by
    transformers). ModelLoadError names what is wrong with a path: missing, a file, no or bad config.json."""
    path = resolve_model_path(name)
    local = Path(path)
    if not local.exists():
        if path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise ModelLoadError(f"model directory not found: {path}")
        return None
    if not local.is_dir():
        raise ModelLoadError(f"{local} is a file; a model is a directory written by save_pretrained")
    if not (local / "config.json").is_file():
        raise ModelLoadError(f"{local} is not a transformers model directory (no config.json)")
    try:
        return json.loads((local / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{local / 'config.json'} is not valid JSON: {exc}") from exc
