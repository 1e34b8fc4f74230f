"""Adapters: the output contract on real-size random-init architectures and the shipped model, and clear
errors for model directories that cannot be loaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from eive_audit.pipeline.models.detr import DetrAdapter, ModelLoadError
from eive_audit.pipeline.models.locate import DEFAULT_MODEL_DIR
from eive_audit.pipeline.models.families import FAMILIES, build_config
from eive_audit.pipeline.models.preprocess import PreprocessConfig, preprocess
from eive_audit.pipeline.sources.decode import decode_rgb


def _hook_counts(model: torch.nn.Module) -> list[int]:
    """Forward hooks per module. transformers adds its own on a model's first forward, so callers
    compare counts between two later points, not against zero."""
    return [len(m._forward_hooks) for m in model.modules()]


def _check_contract(adapter: DetrAdapter, images: list[torch.Tensor]) -> None:
    batch = adapter.preprocess(images)
    # transformers' own hooks come with any first forward: a 64 px one adds them (a second forward of the real
    # batch cost an 800 px DETR-R50 pass, seconds on a CPU), and the real batch's forward must leave them so.
    warm_up = preprocess([torch.zeros(3, 64, 64, dtype=torch.uint8)], PreprocessConfig(64, 64), adapter.device)
    with torch.inference_mode():
        adapter.forward(warm_up)
        hooks_before = _hook_counts(adapter.model)
        out = adapter.forward(batch)
    b, q = len(images), adapter.model.config.num_queries
    n_layers, heads = adapter.num_layers, adapter.model.config.decoder_attention_heads
    h, w = out.grid
    assert out.boxes.shape == (b, q, 4)
    assert out.layer_logits.shape == (n_layers, *out.logits.shape)
    assert out.layer_boxes.shape == (n_layers, b, q, 4)
    assert out.cross_attentions.shape == (n_layers, b, heads, q, h * w)
    assert out.token_mask.shape == (b, h, w)
    # ResNet-50 downsamples by 32 (the small model by 8), rounding up: the grid follows the padded input.
    height, width = batch.pixel_values.shape[-2:]
    assert any((h, w) == (math.ceil(height / s), math.ceil(width / s)) for s in (8, 32))
    torch.testing.assert_close(out.layer_logits[-1], out.logits)
    # Post-softmax attention rows sum to one over the image tokens.
    torch.testing.assert_close(out.cross_attentions.float().sum(-1), torch.ones(n_layers, b, heads, q), atol=1e-3, rtol=0)
    detections = adapter.postprocess(out, batch, score_threshold=0.0, max_detections=10)
    probs = adapter.class_probs(out.logits)
    for i, det in enumerate(detections):
        assert len(det.queries) == min(10, q)
        assert torch.all(det.scores[:-1] >= det.scores[1:])
        torch.testing.assert_close(det.scores, probs[i, det.queries].max(-1).values.cpu())
        height, width = images[i].shape[-2:]
        assert det.boxes[:, 0].min() >= -1 and det.boxes[:, 2].max() <= width + 1
        assert det.boxes[:, 1].min() >= -1 and det.boxes[:, 3].max() <= height + 1
    assert _hook_counts(adapter.model) == hooks_before, "our hooks must not outlive a forward"


def test_detr_r50_at_800px(detr_r50_dir: Path, coco_tiny: Path) -> None:
    adapter = DetrAdapter.load(detr_r50_dir, device="cpu")
    assert adapter.preprocess_config.shortest_edge == 800
    paths = sorted((coco_tiny / "val2017").glob("*.jpg"))[:2]
    images = [decode_rgb(p, adapter.preprocess_config.longest_edge) for p in paths]
    batch = adapter.preprocess(images)
    assert min(batch.input_sizes[0].tolist()) == 800 and batch.pixel_mask.shape[0] == 2
    assert adapter.model.config.num_queries == 100 and adapter.num_layers == 6
    _check_contract(adapter, images)


@pytest.mark.parametrize("family", [name for name, family in FAMILIES.items()
                                    if not family.deformable])  # deformable ones: tests/test_deformable.py
def test_per_layer_predictions_match_the_models_auxiliary_heads(family: str, tmp_path: Path) -> None:
    """Our hooked per-layer predictions equal the auxiliary outputs transformers computes for its loss."""
    torch.manual_seed(0)
    config = build_config(family, ["a", "b", "c"])
    config.auxiliary_loss = True
    model = FAMILIES[family].model_class(config)
    adapter = DetrAdapter(model, PreprocessConfig(160, 224), torch.device("cpu"))
    images = [torch.randint(0, 255, (3, 120, 150), dtype=torch.uint8), torch.randint(0, 255, (3, 140, 100), dtype=torch.uint8)]
    _check_contract(adapter, images)
    batch = adapter.preprocess(images)
    labels = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    with torch.no_grad():
        reference = model(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask, labels=labels)
        ours = adapter.forward(batch)
    for layer, aux in enumerate(reference.auxiliary_outputs):
        torch.testing.assert_close(ours.layer_logits[layer], aux["logits"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.layer_boxes[layer], aux["pred_boxes"], atol=1e-5, rtol=1e-4)


def test_shipped_model_contract() -> None:
    adapter = DetrAdapter.load("default", device="cpu")
    assert (DEFAULT_MODEL_DIR / "README.md").is_file(), "the shipped model has a model card"
    assert adapter.label_names[3] == "hexagon"
    image = torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8)
    _check_contract(adapter, [image, image])
    with torch.inference_mode():
        assert adapter.forward(adapter.preprocess([image])).grid == (16, 16)


def test_hooks_are_removed_when_forward_raises() -> None:
    model = FAMILIES["conditional-detr-small"].model_class(build_config("conditional-detr-small", ["a"]))
    adapter = DetrAdapter(model, PreprocessConfig(64, 64), torch.device("cpu"))
    batch = adapter.preprocess([torch.zeros(3, 64, 64, dtype=torch.uint8)])
    with torch.inference_mode():
        adapter.forward(batch)
    hooks_before = _hook_counts(adapter.model)
    batch.pixel_values = batch.pixel_values[:, :2]  # wrong channel count: the backbone raises
    with pytest.raises(ValueError, match="channel dimension"):
        adapter.forward(batch)
    assert _hook_counts(adapter.model) == hooks_before


def _write(path: Path, name: str, content: bytes | str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    target = path / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "absent", "model directory not found"),
        (lambda d: _write(d, "x", "") / "x", "is a file"),
        (lambda d: _write(d / "empty", "notes.txt", "hi"), "no config.json"),
        (lambda d: _write(d / "badjson", "config.json", "{oops"), "not valid JSON"),
        (lambda d: _write(d / "bert", "config.json", json.dumps({"model_type": "bert"})), "not supported"),
    ],
)
def test_wrong_model_directories_get_clear_errors(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        DetrAdapter.load(make(tmp_path), device="cpu")


def test_corrupt_weights_get_a_clear_error(tmp_path: Path) -> None:
    config = build_config("conditional-detr-small", ["a"])
    config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot load the weights"):
        DetrAdapter.load(tmp_path, device="cpu")
