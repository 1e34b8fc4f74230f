"""Training a ViT classifier: a short run writes a stock-loadable model, an interrupted run resumes to exactly the
weights of an uninterrupted one, fine-tuning relabels by name, the flow shows progress; and the shipped
`default-vit` is accurate on a seed it never saw and has learned the planted shortcut."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTForImageClassification, ViTImageProcessor

from interrupt import Interrupted, crash_at
from eive_audit.pipeline.config import TrainConfig
from eive_audit.pipeline.sources.synthetic_classify import generate_classify
from eive_audit.pipeline.train import CHECKPOINT_DIR
from eive_audit.pipeline.train_classify import train_classifier

CLASSES = ["circle", "square", "triangle", "hexagon"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classify_data")
    generate_classify(root, n_train=12, n_val=0, seed=5)
    return root


def _config(data: Path, out: Path, **changes: object) -> TrainConfig:
    settings = {"task": "classify", "index": data / "annotations" / "train.json", "images": data / "images" / "train",
                "out": out, "steps": 4, "batch_size": 4, "checkpoint_every": 2, "warmup_steps": 2, "device": "cpu",
                "threads": 1, **changes}
    return TrainConfig(**settings)


def test_a_short_run_writes_a_model_the_stock_classes_load(data: Path, tmp_path: Path) -> None:
    summary = train_classifier(_config(data, tmp_path / "m", steps=3))
    assert summary["steps"] == 3 and summary["images"] == 12 and 0.0 <= summary["final_accuracy"] <= 1.0
    out = tmp_path / "m"
    assert not (out / CHECKPOINT_DIR).exists(), "the checkpoint is removed once training finishes"
    model = ViTForImageClassification.from_pretrained(out)
    assert model.config.id2label == dict(enumerate(CLASSES)) and model.config.image_size == 96
    processor = ViTImageProcessor.from_pretrained(out)
    assert (processor.size.height, processor.size.width) == (96, 96)
    assert list(processor.image_mean) == list(processor.image_std) == [0.5, 0.5, 0.5]
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["config"]["task"] == "classify" and saved["summary"]["steps"] == 3


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(data: Path, tmp_path: Path) -> None:
    train_classifier(_config(data, tmp_path / "straight"))
    with pytest.raises(Interrupted):
        train_classifier(_config(data, tmp_path / "resumed"), on_step=crash_at(3))
    with pytest.raises(ValueError, match="written by a run with other settings"):
        train_classifier(_config(data, tmp_path / "resumed", lr=1e-3))
    seen: list[int] = []
    train_classifier(_config(data, tmp_path / "resumed"), on_step=lambda step, _logged: seen.append(step))
    assert seen == [3, 4], "the rerun starts after the last checkpoint"
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-5, rtol=1e-4, msg=key)


def test_fine_tuning_onto_other_class_names_relabels_the_head(data: Path, tmp_path: Path) -> None:
    train_classifier(_config(data, tmp_path / "base", steps=1))
    index = json.loads((data / "annotations" / "train.json").read_text())
    renamed = {"circle": "disc", "triangle": "wedge"}
    index["classes"] = [renamed.get(name, name) for name in index["classes"]]
    for image in index["images"]:
        image["label"] = renamed.get(image["label"], image["label"])
    (tmp_path / "renamed.json").write_text(json.dumps(index))
    train_classifier(_config(data, tmp_path / "tuned", index=tmp_path / "renamed.json", init=tmp_path / "base", steps=1))
    tuned = ViTForImageClassification.from_pretrained(tmp_path / "tuned")
    assert tuned.config.id2label == {0: "disc", 1: "square", 2: "wedge", 3: "hexagon"}
    base = load_file(tmp_path / "base" / "model.safetensors")["classifier.weight"]
    torch.testing.assert_close(tuned.classifier.weight[[1, 3]], base[[1, 3]], atol=1e-2, rtol=0,
                               msg="square and hexagon keep their head rows (one small step away)")


def test_the_flow_trains_a_classifier_with_progress_lines(data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from eive_audit.flows.train import train_task

    train_task.fn(_config(data, tmp_path / "m", steps=2, log_every=1))
    lines = re.findall(r"step (\d)/2 loss \d+\.\d+ accuracy \d\.\d+ elapsed", capsys.readouterr().err)
    assert lines == ["1", "2"]
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_the_shipped_vit_is_accurate_on_a_fresh_seed_and_has_learned_the_planted_shortcut(tmp_path: Path) -> None:
    """A seed training never saw (the card quotes 1,000 images of seed 2024). Drawn like the training data (the
    cue beside hexagons only): top-1 >= 0.9, and the cued hexagons' accuracy falls clearly when the same images
    are re-rendered without the cue. On the shortcut probe (the cue beside other shapes too) most of those
    are called hexagons."""
    from eive_audit.pipeline.train_classify import evaluate_classifier

    like_training = generate_classify(tmp_path / "id", n_train=0, n_val=200, seed=2025, val_cue_other_rate=0.0)["val"]
    result = evaluate_classifier("default-vit", like_training, tmp_path / "id" / "images" / "val", device="cpu")
    assert result["images"] == 200 and result["top1"] >= 0.9, result
    assert result["cued_with_cue_images"] >= 30, result
    assert result["cued_with_cue"] - result["cued_without_cue"] >= 0.2, result
    probe = generate_classify(tmp_path / "probe", n_train=0, n_val=100, seed=2025)["val"]
    result = evaluate_classifier("default-vit", probe, tmp_path / "probe" / "images" / "val", device="cpu")
    assert result["others_with_cue_images"] >= 8 and result["others_with_cue_called_cued"] >= 0.5, result
