"""AAJTS (METHODS.md 1d): the losses' values, their gradients into the attention and the weights that make it,
the matches read off transformers' set loss, a short training run that concentrates the attention, and the
benchmark's quick mode."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli import invoke_ok
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel

from eive_audit.pipeline.aajts import (DENSE_ONLY, Pairs, attention_losses, capture_matches, concentration_loss, gt_coverage,
                            joint_loss, require_dense_attention, stability_loss)
from eive_audit.pipeline.metrics.localization import box_coverage
from eive_audit.pipeline.models.locate import DEFAULT_MODEL_DIR
from eive_audit.pipeline.models.families import FAMILIES, MODEL_TYPES, build_config

REPO = Path(__file__).resolve().parents[1]


@st.composite
def box_and_maps(draw: st.DrawFn) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A grid, a cell-aligned box (coverage 0 / 1) that leaves cells outside, and two random maps: one
    entirely inside the box, one entirely outside."""
    h, w = draw(st.integers(2, 8)), draw(st.integers(2, 8))
    x0, y0 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
    x1, y1 = draw(st.integers(x0 + 1, w)), draw(st.integers(y0 + 1, h))
    assume((x1 - x0) * (y1 - y0) < h * w)
    coverage = box_coverage(torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32), (h, w))
    values = torch.tensor(draw(st.lists(st.floats(0.01, 1.0), min_size=h * w, max_size=h * w))).view(1, h, w)
    return (h, w), coverage, values * coverage, values * (1 - coverage)


@settings(max_examples=60, deadline=None)
@given(box_and_maps(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_concentration_is_zero_inside_the_box_and_grows_with_the_mass_that_leaves_it(
        case: tuple[tuple[int, int], torch.Tensor, torch.Tensor, torch.Tensor], t1: float, t2: float) -> None:
    _, coverage, inside, outside = case
    inside, outside = inside / inside.sum(), outside / outside.sum()

    def loss(t: float) -> float:  # a map with a share t of its mass outside the box
        return float(concentration_loss((1 - t) * inside + t * outside, coverage))

    assert loss(0.0) == pytest.approx(0.0, abs=1e-6)
    assert loss(t1) == pytest.approx(t1, abs=1e-5)  # exactly the share outside
    if t1 < t2 - 1e-3:
        assert loss(t1) < loss(t2)
    assert float(concentration_loss(7.0 * inside, coverage)) == pytest.approx(0.0, abs=1e-6), "scale-free"


@settings(max_examples=40, deadline=None)
@given(box_and_maps(), st.floats(0.05, 1.0))
def test_stability_is_zero_for_the_same_map_and_grows_as_a_layer_drifts_from_the_last(
        case: tuple[tuple[int, int], torch.Tensor, torch.Tensor, torch.Tensor], t: float) -> None:
    _, _, inside, outside = case
    assert float(stability_loss(3.0 * inside, inside)) == pytest.approx(0.0, abs=1e-6)
    drifted = [float(stability_loss((1 - s) * inside + s * outside, inside)) for s in (t / 2, t)]
    assert 0.0 < drifted[0] < drifted[1] <= 1.0 + 1e-6  # disjoint supports: cosine 0 at s = 1


def test_gt_coverage_maps_a_normalised_box_through_the_padding_onto_the_grid() -> None:
    # A 64 x 96 image padded to 64 x 128, stride 8 -> grid 8 x 16. Box cx 0.5, cy 0.5, w 0.5, h 0.5 of the
    # image: x 24..72 px -> cells 3..9, y 16..48 px -> cells 2..6 (the padding does not stretch it).
    coverage = gt_coverage(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), torch.tensor([[64, 96]]), (64, 128), (8, 16))
    expected = torch.zeros(1, 8, 16)
    expected[0, 2:6, 3:9] = 1
    torch.testing.assert_close(coverage, expected)


def _pairs(device: torch.device = torch.device("cpu")) -> list[Pairs]:
    """Two layers, two images: layer 0 matched other queries than the last layer to the same GT objects."""
    layer0 = [(torch.tensor([1, 3]), torch.tensor([0, 1])), (torch.tensor([0]), torch.tensor([0]))]
    last = [(torch.tensor([2, 3]), torch.tensor([1, 0])), (torch.tensor([4]), torch.tensor([0]))]
    return [Pairs.from_match(layer0, device), Pairs.from_match(last, device)]


def _labels() -> list[dict[str, torch.Tensor]]:
    return [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.4, 0.4, 0.5], [0.7, 0.6, 0.3, 0.3]])},
            {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.2]])}]


def test_losses_have_exact_gradients_with_respect_to_the_attention_and_stop_at_the_last_layer() -> None:
    torch.manual_seed(0)
    grid, pixel_mask = (4, 6), torch.ones(2, 32, 48, dtype=torch.long)
    pixel_mask[1, :, 32:] = 0  # image 1 is 32 x 32, padded
    logits = torch.randn(2, 2, 2, 5, 24, dtype=torch.float64)  # [L, B, M, Q, N]
    logits[:, 1, ..., torch.tensor([4, 5, 10, 11, 16, 17, 22, 23])] = -1e4  # padding columns, as the model masks them
    attention = logits.softmax(-1)
    last = attention[1].clone()

    def losses(first: torch.Tensor) -> torch.Tensor:
        concentration, stability = attention_losses((first, last), _pairs(), _labels(), pixel_mask, grid)
        return concentration + stability

    first = attention[0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(losses, (first,), eps=1e-6, atol=1e-6)
    last.requires_grad_(True)
    _, stability = attention_losses((first, last), _pairs(), _labels(), pixel_mask, grid)
    first_grad, last_grad = torch.autograd.grad(stability, (first, last), allow_unused=True)
    assert first_grad.abs().sum() > 0 and (last_grad is None or last_grad.abs().sum() == 0), "stop-gradient on map_L"


def _tiny(kind: str, auxiliary_loss: bool = True) -> PreTrainedModel:
    """A random-init model of a dense family, small enough for a unit test."""
    torch.manual_seed(0)
    backbone = {"backbone_config": {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32],
                                    "depths": [1, 1], "layer_type": "basic", "out_features": ["stage2"]},
                "use_timm_backbone": False}
    sizes = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "num_queries": 6,
             "auxiliary_loss": auxiliary_loss, "id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1}}
    family = MODEL_TYPES[kind]
    extra = {} if kind == "dab-detr" else {"use_pretrained_backbone": False}
    return family.model_class(family.config_class(**backbone, **sizes, **extra, attn_implementation="eager")).train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    pixel_mask = torch.ones(2, 64, 96, dtype=torch.long)
    pixel_mask[1, :, 64:] = 0
    return torch.randn(2, 3, 64, 96), pixel_mask


@pytest.mark.parametrize("kind", sorted({family.model_type for family in FAMILIES.values()
                                         if not family.deformable}))  # every dense architecture
@pytest.mark.parametrize("auxiliary_loss", [True, False])
def test_joint_loss_reuses_the_set_loss_matches_on_every_dense_family(kind: str, auxiliary_loss: bool) -> None:
    model = _tiny(kind, auxiliary_loss)
    pixels, mask = _batch()
    with capture_matches() as calls:
        joint = joint_loss(model, pixels, mask, _labels(), lambda_in=0.5, lambda_stab=0.1)
    assert len(calls) == (2 if auxiliary_loss else 1), "matching ran once per matched layer, inside the set loss"
    values = joint.logged()
    assert all(math.isfinite(v) for v in values.values()), values
    assert 0 < values["concentration_loss"] < 1 and 0 <= values["stability_loss"] <= 2
    expected = values["detection_loss"] + 0.5 * values["concentration_loss"] + 0.1 * values["stability_loss"]
    assert values["loss"] == pytest.approx(expected, rel=1e-5)


def test_the_aajts_term_alone_reaches_every_layers_cross_attention_weights() -> None:
    model = FAMILIES["conditional-detr-small"].model_class(build_config("conditional-detr-small", ["a", "b"])).train()
    pixels, mask = _batch()
    joint = joint_loss(model, pixels, mask, _labels(), lambda_in=0.5, lambda_stab=0.1)
    # Keys and their positions in every layer; the queries (whose content is zero entering layer 0, so layer 0's
    # q_content_proj weight has nothing to learn from); the memory through the input projection.
    names = [f"model.decoder.layers.{i}.encoder_attn.{p}.weight" for i in range(3)
             for p in ("k_content_proj", "k_pos_proj")]
    names += ["model.query_position_embeddings.weight", "model.input_projection.weight"]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(0.5 * joint.concentration + 0.1 * joint.stability, [params[n] for n in names])
    for name, grad in zip(names, grads):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_deformable_families_are_refused_with_a_clear_error() -> None:
    model = FAMILIES["deformable-detr-small"].model_class(build_config("deformable-detr-small", ["a"]))
    with pytest.raises(ValueError, match=DENSE_ONLY):
        require_dense_attention(model)


def _concentration(model_dir: Path, synth: Path) -> float:
    """The AAJTS concentration loss of a trained model on all of the synth train images, eval mode."""
    from eive_audit.pipeline.models.detr import load_hf_model
    from eive_audit.pipeline.models.preprocess import PreprocessConfig, preprocess
    from eive_audit.pipeline.sources import CocoSource, ImageRecord
    from eive_audit.pipeline.train import _TrainSet, fine_tune_label_map

    model = load_hf_model(model_dir).eval()
    source = CocoSource(synth / "annotations" / "train.json", synth / "images" / "train")
    records = [r for r in source if isinstance(r, ImageRecord) and len(r.labels) > 0]
    dataset = _TrainSet(records, fine_tune_label_map(source, model.config.id2label), hflip=False, seed=0)
    items = [dataset[(index, 0)] for index in range(len(dataset))]
    batch = preprocess([image for image, _ in items], PreprocessConfig.from_dir(model_dir))
    with torch.no_grad():
        return float(joint_loss(model, batch.pixel_values, batch.pixel_mask, [t for _, t in items], 0.5, 0.1)
                     .concentration)


def test_fine_tuning_with_aajts_concentrates_the_attention(synth: Path, tmp_path: Path) -> None:
    from eive_audit.pipeline.train import TrainConfig, train

    # 30 steps of 4 images: both margins about 0.02 (at 8 images a step, 0.03, for twice the time; at 15 steps
    # of 8 under 0.01)
    common = ["--coco", str(synth / "annotations" / "train.json"), "--images", str(synth / "images" / "train"),
              "--init", str(DEFAULT_MODEL_DIR), "--steps", "30", "--batch-size", "4", "--lr", "5e-4",
              "--device", "cpu", "--seed", "0"]
    stdout = invoke_ok("train", *common, "--out", str(tmp_path / "with"), "--aajts", "--lambda-in", "2.0")
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert {"final_loss", "final_detection_loss", "final_concentration_loss", "final_stability_loss"} <= set(summary)
    assert json.loads((tmp_path / "with" / "training_config.json").read_text())["config"]["lambda_in"] == 2.0
    train(TrainConfig(coco=synth / "annotations" / "train.json", images=synth / "images" / "train",
                      out=tmp_path / "without", init=DEFAULT_MODEL_DIR, steps=30, batch_size=4, lr=5e-4,
                      device="cpu", seed=0, threads=1))
    before = _concentration(DEFAULT_MODEL_DIR, synth)
    with_aajts, without = _concentration(tmp_path / "with", synth), _concentration(tmp_path / "without", synth)
    assert with_aajts < before - 0.01 and with_aajts < without - 0.01, (before, with_aajts, without)


@pytest.mark.slow
def test_benchmark_quick_mode_prints_both_arms(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "aajts.py"), "--quick", "--work", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == {"without", "with", "setup"} and result["setup"]["init"] == "shipped model"
    for arm in ("without", "with"):
        for key in ("AP50", "AP", "epg", "pointing", "insertion_auc", "deletion_auc", "recall_drop", "flagged"):
            assert isinstance(result[arm][key], (int, float)) and math.isfinite(result[arm][key]), (arm, key)
    assert "final_concentration_loss" in result["with"] and "final_concentration_loss" not in result["without"]
