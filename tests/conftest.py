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
    from eive_audit.pipeline.sources.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, n_train=24, n_val=40, seed=3)
    return root


@pytest.fixture(scope="session")
def detr_r50_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-init DETR-R50 of the published architecture, 80 labels."""
    from eive_audit.pipeline.models.families import write_random_model

    return write_random_model("detr-r50", [f"LABEL_{i}" for i in range(80)], tmp_path_factory.mktemp("detr_r50"))


@pytest.fixture()
def broken(tmp_path: Path) -> tuple[Path, Path]:
    """A 6-image dataset with one of each problem; image 1 is fine."""
    import json

    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for name in ("ok.png", "badbox.png"):
        Image.new("RGB", (64, 48), "gray").save(root / name)
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "outside.png").write_bytes((root / "ok.png").read_bytes())
    images = [
        {"id": 1, "file_name": "ok.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "missing.png", "width": 64, "height": 48},
        {"id": 3, "file_name": "corrupt.png", "width": 64, "height": 48},
        {"id": 4, "file_name": "../outside.png", "width": 64, "height": 48},
        {"id": 5, "file_name": "badbox.png", "width": 64, "height": 48},
    ]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
        {"id": 11, "image_id": 5, "category_id": 1, "bbox": [50, 40, 30, 30]},  # leaves the image
        {"id": 12, "image_id": 5, "category_id": 1, "bbox": [5, 5, 0, 4]},  # zero width
        {"id": 13, "image_id": 5, "category_id": 99, "bbox": [5, 5, 4, 4]},  # unknown category
        {"id": 14, "image_id": 5, "category_id": 1, "bbox": [1, 1, 8, 8]},  # fine
    ]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return ann_file, root
