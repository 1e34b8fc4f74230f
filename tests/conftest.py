"""Shared fixtures: real coco_tiny, small synthetic splits, random-init models. No downloads, ever."""

from __future__ import annotations

import os
from pathlib import Path

# Set before fiftyone / prefect / transformers are imported anywhere in the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))

import pytest

REPO = Path(__file__).resolve().parents[1]
COCO_TINY = REPO.parent / "shared" / "data" / "coco_tiny"


@pytest.fixture(scope="session")
def coco_tiny() -> Path:
    if not COCO_TINY.is_dir():
        pytest.fail(f"coco_tiny not found at {COCO_TINY}: tests expect ../shared beside the checkout")
    return COCO_TINY


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small planted-cue dataset: 24 train and 40 val images, seed 3."""
    from pipeline.sources.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, n_train=24, n_val=40, seed=3)
    return root


@pytest.fixture(scope="session")
def detr_r50_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-init DETR-R50 of the published architecture, 80 labels."""
    from pipeline.models.families import write_random_model

    return write_random_model("detr-r50", [f"LABEL_{i}" for i in range(80)], tmp_path_factory.mktemp("detr_r50"))
