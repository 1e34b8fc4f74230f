"""Training: a smoke run through the real CLI and Prefect flow, and an interrupted run that resumes to
exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cli import invoke, invoke_ok
from safetensors.torch import load_file

from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.config import TrainConfig
from eive_audit.pipeline.train import CHECKPOINT_DIR, train


def test_train_cli_smoke_run_writes_a_loadable_model(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    stdout = invoke_ok("train", "--coco", str(synth / "annotations" / "train.json"),
                       "--images", str(synth / "images" / "train"), "--out", str(out), "--steps", "3",
                       "--batch-size", "4", "--checkpoint-every", "2", "--device", "cpu")
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["images"] == 24
    assert not (out / CHECKPOINT_DIR).exists(), "the checkpoint is removed once training finishes"
    adapter = DetrAdapter.load(out, device="cpu")
    assert [adapter.label_names[i] for i in range(4)] == ["circle", "square", "triangle", "hexagon"]
    assert adapter.detect([torch.zeros(3, 128, 128, dtype=torch.uint8)], score_threshold=0.0)[0].boxes.shape == (20, 4)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("aajts", [False, True])
def test_interrupted_training_resumes_to_the_same_weights(synth: Path, tmp_path: Path, aajts: bool) -> None:
    def config(out: Path) -> TrainConfig:
        return TrainConfig(coco=synth / "annotations" / "train.json", images=synth / "images" / "train", out=out,
                           steps=4, batch_size=4, checkpoint_every=2, warmup_steps=2, device="cpu", threads=1,
                           aajts=aajts)

    train(config(tmp_path / "straight"))

    def crash_at_3(step: int, _losses: dict[str, float]) -> None:
        if step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(config(tmp_path / "resumed"), on_step=crash_at_3)
    assert (tmp_path / "resumed" / CHECKPOINT_DIR / "trainer_state.pt").is_file()
    seen: list[int] = []
    train(config(tmp_path / "resumed"), on_step=lambda step, _loss: seen.append(step))
    assert seen == [3, 4], "the rerun starts after the last checkpoint"
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-5, rtol=1e-4, msg=key)


def test_fine_tuning_matches_labels_by_name_and_refuses_unknown_categories(synth: Path) -> None:
    from eive_audit.pipeline.sources import CocoSource
    from eive_audit.pipeline.train import fine_tune_label_map

    source = CocoSource(synth / "annotations" / "train.json", synth / "images" / "train")
    model_labels = {0: "hexagon", 1: "triangle", 2: "square", 3: "circle", 4: "star"}
    mapping = fine_tune_label_map(source, model_labels)
    assert {source.categories[c]: model_labels[label] for c, label in mapping.items()} == {
        name: name for name in source.categories.values()}
    with pytest.raises(ValueError, match="no label for the dataset categories"):
        fine_tune_label_map(source, {0: "circle", 1: "square", 2: "triangle", 3: "star"})


def test_a_checkpoint_resumes_only_under_the_settings_that_wrote_it(synth: Path, tmp_path: Path) -> None:
    config = TrainConfig(coco=synth / "annotations" / "train.json", images=synth / "images" / "train",
                         out=tmp_path / "model", steps=3, batch_size=4, checkpoint_every=2, device="cpu", threads=1)

    def crash_at_3(step: int, _losses: dict[str, float]) -> None:
        if step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(config, on_step=crash_at_3)
    with pytest.raises(ValueError, match="written by a run with other settings"):
        train(config.model_copy(update={"aajts": True}))
    seen: list[int] = []
    longer = config.model_copy(update={"steps": 4, "checkpoint_every": 5})
    train(longer, on_step=lambda step, _losses: seen.append(step))
    assert seen == [3, 4], "a longer schedule, or other checkpoint spacing, may resume the same run"


def test_training_without_a_terminal_prints_a_progress_line_every_log_every_steps(synth: Path,
                                                                                   tmp_path: Path) -> None:
    result = invoke("train", "--coco", synth / "annotations" / "train.json", "--images", synth / "images" / "train",
                    "--out", tmp_path / "m", "--init", "default", "--steps", "5", "--batch-size", "2",
                    "--log-every", "2", "--device", "cpu", "--threads", "1")
    assert result.code == 0, result.stderr[-4000:]
    lines = re.findall(r"step (\d+)/5 loss (\d+\.\d+) elapsed (\d+\.\d)s rate (\d[\d.e+-]*) steps/s", result.stderr)
    assert [int(step) for step, *_ in lines] == [2, 4, 5], result.stderr[-2000:]
    assert all(float(elapsed) > 0 and float(rate) > 0 for _, _, elapsed, rate in lines)
