"""Training: a smoke run through the real CLI and Prefect flow, an interrupted run that resumes to exactly
the weights of an uninterrupted one, fine-tuning onto new category names, and progress lines in a log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli import invoke, invoke_ok
from interrupt import Interrupted, crash_at

from eive_audit.pipeline.models.detr import DetrAdapter, load_hf_model
from eive_audit.pipeline.models.families import FAMILIES, build_config
from eive_audit.pipeline.config import TrainConfig
from eive_audit.pipeline.train import CHECKPOINT_DIR, relabel, train


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


@pytest.mark.parametrize("aajts", [False, True])
def test_interrupted_training_resumes_to_the_same_weights(synth: Path, tmp_path: Path, aajts: bool) -> None:
    def config(out: Path) -> TrainConfig:
        return TrainConfig(coco=synth / "annotations" / "train.json", images=synth / "images" / "train", out=out,
                           steps=4, batch_size=4, checkpoint_every=2, warmup_steps=2, device="cpu", threads=1,
                           aajts=aajts)

    train(config(tmp_path / "straight"))

    with pytest.raises(Interrupted):
        train(config(tmp_path / "resumed"), on_step=crash_at(3))
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
    with pytest.raises(ValueError, match="no label named 'hexagon'"):
        fine_tune_label_map(source, {0: "circle", 1: "square", 2: "triangle", 3: "star"})
    with pytest.raises(ValueError, match="no label for the dataset categories"):
        fine_tune_label_map(source, {k: f"LABEL_{k}" for k in range(5)})


def test_a_checkpoint_resumes_only_under_the_settings_that_wrote_it(synth: Path, tmp_path: Path) -> None:
    config = TrainConfig(coco=synth / "annotations" / "train.json", images=synth / "images" / "train",
                         out=tmp_path / "model", steps=3, batch_size=4, checkpoint_every=2, device="cpu", threads=1)

    with pytest.raises(Interrupted):
        train(config, on_step=crash_at(3))
    with pytest.raises(ValueError, match="written by a run with other settings"):
        train(config.model_copy(update={"aajts": True}))
    seen: list[int] = []
    longer = config.model_copy(update={"steps": 4, "checkpoint_every": 5})
    train(longer, on_step=lambda step, _losses: seen.append(step))
    assert seen == [3, 4], "a longer schedule, or other checkpoint spacing, may resume the same run"


# The synth categories renamed and renumbered: square and hexagon keep their names (under other ids), circle
# and triangle become disc and wedge, names the shipped model does not have.
RENAMED = {"circle": (4, "disc"), "square": (1, "square"), "triangle": (3, "wedge"), "hexagon": (2, "hexagon")}


def _renamed_split(synth: Path, out: Path) -> Path:
    data = json.loads((synth / "annotations" / "train.json").read_text())
    old_names = {c["id"]: c["name"] for c in data["categories"]}
    data["categories"] = [{"id": i, "name": name} for i, name in sorted(RENAMED.values())]
    for ann in data["annotations"]:
        ann["category_id"] = RENAMED[old_names[ann["category_id"]]][0]
    out.write_text(json.dumps(data))
    return out


def test_fine_tuning_onto_new_category_names_saves_a_model_with_the_dataset_labels(synth: Path,
                                                                                    tmp_path: Path) -> None:
    coco, images, out = _renamed_split(synth, tmp_path / "renamed.json"), synth / "images" / "train", tmp_path / "m"
    invoke_ok("train", "--coco", coco, "--images", images, "--out", out, "--init", "default", "--steps", "2",
              "--batch-size", "2", "--device", "cpu", "--threads", "1")
    assert DetrAdapter.load(out, device="cpu").label_names == {0: "square", 1: "hexagon", 2: "wedge", 3: "disc"}
    evaluation = json.loads(invoke_ok("eval", "--coco", coco, "--images", images, "--model", out,
                                      "--device", "cpu").strip().splitlines()[-1])
    assert evaluation["label_mapping"] == "name"
    assert json.loads((out / "preprocessor_config.json").read_text())["size"]["shortest_edge"] == 128, \
        "--init default trains at the shipped model's input size"


def _small_detr(names: list[str]) -> torch.nn.Module:
    """A random-init DETR (softmax head with a no-object row) of the small recipe's size."""
    small = FAMILIES["conditional-detr-small"].config_kwargs
    config = FAMILIES["detr-r50"].config_class(**small, use_pretrained_backbone=False, id2label=dict(enumerate(names)),
                                               label2id={name: i for i, name in enumerate(names)})
    return FAMILIES["detr-r50"].model_class(config)


SHAPES = ["circle", "square", "triangle", "hexagon"]
MODELS = {  # the old model, and the prefixes of its label-dependent tensors
    "shipped": (lambda: load_hf_model("default"), ("class_labels_classifier.",)),
    "detr": (lambda: _small_detr(SHAPES), ("class_labels_classifier.",)),
    "deformable": (lambda: FAMILIES["deformable-detr-small"].model_class(build_config("deformable-detr-small", SHAPES)),
                   ("class_embed.",)),
}


@pytest.mark.parametrize("names", [["square", "hexagon", "wedge", "disc"],  # as many labels: no size mismatch
                                   ["hexagon", "star", "circle"]])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_relabelling_keeps_the_head_rows_of_the_names_that_agree(kind: str, names: list[str]) -> None:
    make, head = MODELS[kind]
    torch.manual_seed(0)
    old = make()
    new = relabel(old, names)
    assert new.config.id2label == dict(enumerate(names)) and new.config.label2id == {n: i for i, n in enumerate(names)}
    old_state, new_state = old.state_dict(), new.state_dict()
    assert old_state.keys() == new_state.keys()
    heads = [key for key in old_state if key.startswith(head)]
    assert heads, kind
    for key in old_state.keys() - set(heads):
        torch.testing.assert_close(new_state[key], old_state[key], rtol=0, atol=0, msg=key)
    for key in heads:
        before, after = old_state[key], new_state[key]
        assert after.shape[0] == before.shape[0] - len(SHAPES) + len(names), key
        for i, name in enumerate(names):
            if name in SHAPES:
                torch.testing.assert_close(after[i], before[SHAPES.index(name)], rtol=0, atol=0, msg=key)
            elif after.dim() > 1:  # fresh: none of the old rows, in particular not the one that had this index
                assert all(not torch.equal(after[i], row) for row in before), (key, name)  # (a bias may be a prior)
        for extra in range(before.shape[0] - len(SHAPES)):  # DETR's no-object class
            torch.testing.assert_close(after[len(names) + extra], before[len(SHAPES) + extra], rtol=0, atol=0)


def test_fine_tuning_keeps_the_head_when_the_model_has_every_dataset_name(synth: Path) -> None:
    from eive_audit.pipeline.sources import CocoSource
    from eive_audit.pipeline.train import _build_model

    config = TrainConfig(coco=synth / "annotations" / "train.json", images=synth / "images" / "train",
                         out=Path("unused"), init=Path("default"))
    model, cat_to_label, _ = _build_model(config, CocoSource(config.coco, config.images))
    assert model.config.id2label == load_hf_model("default").config.id2label
    assert cat_to_label == {1: 0, 2: 1, 3: 2, 4: 3}


def test_training_without_a_terminal_prints_a_progress_line_every_log_every_steps(synth: Path,
                                                                                   tmp_path: Path) -> None:
    result = invoke("train", "--coco", synth / "annotations" / "train.json", "--images", synth / "images" / "train",
                    "--out", tmp_path / "m", "--init", "default", "--steps", "5", "--batch-size", "2",
                    "--log-every", "2", "--device", "cpu", "--threads", "1")
    assert result.code == 0, result.stderr[-4000:]
    lines = re.findall(r"step (\d+)/5 loss (\d+\.\d+) elapsed (\d+\.\d)s rate (\d[\d.e+-]*) steps/s", result.stderr)
    assert [int(step) for step, *_ in lines] == [2, 4, 5], result.stderr[-2000:]
    assert all(float(elapsed) > 0 and float(rate) > 0 for _, _, elapsed, rate in lines)
