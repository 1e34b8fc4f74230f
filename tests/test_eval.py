"""COCO evaluation: the shipped model's accuracy on fresh synthetic data, and the eval CLI on real COCO."""

from __future__ import annotations

import json
from pathlib import Path

from cli import invoke, invoke_ok
from eive_audit.pipeline.evaluation import coco_metrics
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.sources import CocoSource
from eive_audit.pipeline.sources.synthetic import generate


def test_shipped_model_reaches_ap50_on_a_fresh_val_set(tmp_path: Path) -> None:
    # Seed 4321 was never used for training (seed 0) or for the model card (seed 1234).
    written = generate(tmp_path, n_train=0, n_val=120, seed=4321)
    metrics = coco_metrics(DetrAdapter.load("default", device="cpu"), CocoSource(written["val"], tmp_path / "images" / "val"))
    assert metrics["images"] == 120 and metrics["label_mapping"] == "name"
    assert metrics["AP50"] >= 0.7, metrics


def test_eval_cli_on_coco_tiny_with_a_random_model(coco_tiny: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    invoke_ok("init-model", "--family", "conditional-detr-small", "--num-labels", "80", "--out", str(model))
    metrics = json.loads(invoke_ok("eval", "--coco", str(coco_tiny / "annotations" / "instances_val2017.json"),
                                   "--images", str(coco_tiny / "val2017"), "--model", str(model), "--device", "cpu"))
    assert metrics["images"] == 80 and metrics["errors"] == 0
    assert metrics["label_mapping"] == "position", "LABEL_k names map onto category ids in order"
    assert 0.0 <= metrics["AP"] <= metrics["AP50"] < 0.05, "random weights score (near) zero"


def test_eval_cli_rejects_a_wrong_model_directory(coco_tiny: Path, tmp_path: Path) -> None:
    result = invoke("eval", "--coco", str(coco_tiny / "annotations" / "instances_val2017.json"),
                    "--images", str(coco_tiny / "val2017"), "--model", str(tmp_path))
    assert result.code == 2
    assert "no config.json" in result.stderr
