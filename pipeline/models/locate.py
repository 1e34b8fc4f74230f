"""Where a model named on the command line lives; no torch here, so the config and the CLI stay light."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"


def resolve_model_path(name: str | Path) -> str:
    """`default` names the shipped model; anything else is a local directory or a hub id."""
    return str(DEFAULT_MODEL_DIR) if str(name) == "default" else str(name)
