"""The ViT classifier adapter on tiny random-init models of each library (transformers ViT and distilled
DeiT, timm with register tokens, OpenCLIP as a zero-shot classifier), written in each library's checkpoint
layout by our writers and loaded back: shapes, attention, capture against the library's own forward, prefix
tokens, hooks after errors, the detection-shaped predict, and the families `init-model` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eive_audit.explainers.base import check_supported
from eive_audit.pipeline.models.families import (VIT_FAMILIES, build_config, family_of_model,
                                                 write_open_clip_model, write_random_model, write_timm_model)
from eive_audit.pipeline.models.loading import load_model, task_of_model
from eive_audit.pipeline.models.locate import ModelLoadError
from eive_audit.pipeline.models.vit import ViTAdapter

LABELS = ["circle", "square", "triangle"]
# 32 px in patches of 8 (a 4 x 4 grid), width 32, 2 blocks of 2 heads: milliseconds per forward.
TINY_HF = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64}
TINY_TIMM = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
KINDS = ("vit", "deit", "timm", "open_clip")


def write_tiny_models(root: Path, kinds: tuple[str, ...] = KINDS) -> dict[str, Path]:
    """Tiny random-init checkpoints in each library's layout: vit (transformers), deit (transformers, CLS +
    distillation token), timm (two register tokens), open_clip (zero-shot over LABELS); each kind's weights
    from seed 0, whichever others are written with it."""
    import open_clip
    import timm
    import transformers

    labels = {"id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}
    writers = {
        "vit": lambda out: transformers.ViTForImageClassification(
            transformers.ViTConfig(**TINY_HF, **labels)).save_pretrained(out),
        "deit": lambda out: transformers.DeiTForImageClassificationWithTeacher(
            transformers.DeiTConfig(**TINY_HF, **labels)).save_pretrained(out),
        "timm": lambda out: write_timm_model(timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                                               num_classes=len(LABELS), reg_tokens=2, **TINY_TIMM),
                                             LABELS, out),
        "open_clip": lambda out: write_open_clip_model(open_clip.model.CLIP(**TINY_CLIP), TINY_CLIP, LABELS, out),
    }
    for kind in kinds:
        torch.manual_seed(0)
        writers[kind](root / kind)
    return {kind: root / kind for kind in kinds}


def images(n: int = 3) -> list[torch.Tensor]:
    """Random uint8 images of different sizes, none of them the input size."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, 24 + 8 * i, 40 - 4 * i), dtype=torch.uint8, generator=generator) for i in range(n)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def adapters(dirs: dict[str, Path]) -> dict[str, ViTAdapter]:
    return {kind: load_model(path, "cpu") for kind, path in dirs.items()}  # type: ignore[misc]


def test_each_kind_is_a_classifier_by_its_files_and_loads_with_its_labels(dirs: dict[str, Path],
                                                                          adapters: dict[str, ViTAdapter]) -> None:
    kinds = {"vit": "hf", "deit": "hf", "timm": "timm", "open_clip": "open_clip"}
    for kind, path in dirs.items():
        assert task_of_model(path) == "classify"
        family = family_of_model(path)
        assert family is not None and family.kind == kinds[kind] and family.task == "classify"
        assert isinstance(adapters[kind], ViTAdapter) and adapters[kind].family == family
        assert adapters[kind].label_names == dict(enumerate(LABELS))
        check_supported(["legrad", "cdam", "rollout", "raw-attention"], family)
        with pytest.raises(ValueError, match="explains detect models"):
            check_supported(["eive"], family)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_shapes_attention_rows_and_features(adapters: dict[str, ViTAdapter], kind: str) -> None:
    adapter = adapters[kind]
    batch = adapter.preprocess(images())
    assert batch.pixel_values.shape == (3, 3, 32, 32) and bool(batch.pixel_mask.all())
    assert batch.original_sizes.tolist() == [[24, 40], [32, 36], [40, 32]]
    record = adapter.record(batch, gradients=False)
    out = record.output
    n = adapter.n_prefix + 16
    assert out.logits.shape == (3, len(LABELS)) and out.grid == (4, 4) and out.token_mask.shape == (3, 4, 4)
    assert len(out.attentions) == adapter.num_blocks == 2 and len(record.tokens) == 2
    for attention in out.attentions:
        assert attention.shape == (3, 2, n, n)
        torch.testing.assert_close(attention.sum(-1), torch.ones(3, 2, n))
    assert record.features.shape == (3, 32, 4, 4)
    assert torch.equal(record.features.flatten(2).transpose(1, 2), record.tokens[-1][:, adapter.n_prefix:])


@pytest.mark.parametrize("kind", KINDS)
def test_captured_forward_equals_the_library_forward(adapters: dict[str, ViTAdapter], kind: str) -> None:
    """Our block-by-block run (with attention capture) gives the library's own logits: bit for bit where the
    library's blocks run as they are, to float rounding for OpenCLIP, whose attention is recomputed here."""
    adapter = adapters[kind]
    batch = adapter.preprocess(images())
    ours = adapter.forward(batch).logits
    probs, boxes = adapter.predict(batch.pixel_values, batch.pixel_mask)
    with torch.no_grad():
        theirs = adapter.model(pixel_values=batch.pixel_values).logits if kind in ("vit", "deit") \
            else adapter.model(batch.pixel_values)
    if kind == "open_clip":
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    else:
        assert torch.equal(ours, theirs)
    torch.testing.assert_close(probs[:, 0], theirs.softmax(-1))
    assert probs.shape == (3, 1, len(LABELS)) and boxes.tolist() == [[[0.5, 0.5, 1.0, 1.0]]] * 3


def test_prefix_tokens_and_readout_come_from_the_model(adapters: dict[str, ViTAdapter]) -> None:
    assert {kind: a.n_prefix for kind, a in adapters.items()} == {"vit": 1, "deit": 2, "timm": 3, "open_clip": 1}
    assert adapters["deit"].readout(18)[:3].tolist() == [0.5, 0.5, 0.0]  # the mean of the CLS and distillation heads
    assert adapters["timm"].readout(19).nonzero().flatten().tolist() == [0]  # CLS, not the registers
    assert adapters["timm"].model.num_prefix_tokens == 3


def test_mean_pooled_timm_model_reads_the_patch_rows(tmp_path: Path) -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, global_pool="avg", **TINY_TIMM)
    adapter = ViTAdapter.load(write_timm_model(model, ["a", "b"], tmp_path), "cpu")
    weights = adapter.readout(17)
    assert weights[0] == 0 and torch.allclose(weights[1:], torch.full((16,), 1 / 16))
    batch = adapter.preprocess(images(2))
    assert torch.equal(adapter.forward(batch).logits, adapter.model(batch.pixel_values))


def _hooks(adapter: ViTAdapter) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in adapter.model.modules())


@pytest.mark.parametrize("kind", KINDS)
def test_hooks_are_gone_after_an_error_inside_a_block(adapters: dict[str, ViTAdapter], kind: str) -> None:
    adapter = adapters[kind]
    batch = adapter.preprocess(images(1))
    before = _hooks(adapter)
    tokens = adapter.embed(batch.pixel_values)
    bad = torch.zeros(1, 5, 32)  # the wrong number of tokens for the replaced norm output
    with pytest.raises(RuntimeError):
        adapter.run_block(0, tokens, normed=bad)
    failing = adapter.attention_norm(1).register_forward_hook(lambda *_: 1 / 0)
    try:
        with pytest.raises(ZeroDivisionError):
            adapter.forward(batch)
    finally:
        failing.remove()
    assert _hooks(adapter) == before == 0


def test_run_block_with_replaced_norm_output_keeps_the_residual(adapters: dict[str, ViTAdapter]) -> None:
    """`normed` stands in for the first LayerNorm's output only: passing that output itself changes nothing."""
    adapter = adapters["timm"]
    x = adapter.embed(adapter.preprocess(images(2)).pixel_values)
    plain, attention = adapter.run_block(0, x)
    replaced, same = adapter.run_block(0, x, normed=adapter.attention_norm(0)(x))
    assert torch.equal(plain, replaced) and torch.equal(attention, same)


def test_mean_pool_head_is_the_head_of_the_token_mean(adapters: dict[str, ViTAdapter]) -> None:
    adapter = adapters["vit"]
    tokens = adapter.record(adapter.preprocess(images(2)), gradients=False).tokens[0]
    base = adapter.model.vit
    expected = adapter.model.classifier(base.layernorm(tokens.mean(1)))
    torch.testing.assert_close(adapter.head(tokens, pool="mean"), expected)


def test_record_with_gradients_builds_a_graph_in_inference_mode(adapters: dict[str, ViTAdapter]) -> None:
    adapter = adapters["open_clip"]
    with torch.inference_mode():
        batch = adapter.preprocess(images(1))
        record = adapter.record(batch)
    assert record.output.attentions[0].requires_grad and record.tokens[-1].requires_grad
    (grad,) = torch.autograd.grad(record.output.logits[0, 1], record.output.attentions[0])
    assert grad.shape == record.output.attentions[0].shape
    assert all(p.grad is None for p in adapter.model.parameters())


def test_open_clip_directory_records_its_zero_shot_classes(dirs: dict[str, Path], adapters: dict[str, ViTAdapter],
                                                           tmp_path: Path) -> None:
    config = json.loads((dirs["open_clip"] / "open_clip_config.json").read_text())
    assert config["zero_shot"] == {"class_names": LABELS, "prompt_template": "a photo of a {}."}
    embeddings = adapters["open_clip"].model.class_embeddings
    assert embeddings.shape == (3, 32) and torch.allclose(embeddings.norm(dim=-1), torch.ones(3))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    with pytest.raises(ModelLoadError, match="zero_shot.class_names"):
        ViTAdapter.load(tmp_path, "cpu")


def test_a_detector_directory_is_not_a_vit(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "conditional_detr"}))
    assert task_of_model(tmp_path) == "detect"
    with pytest.raises(ModelLoadError, match="not a ViT classifier"):
        ViTAdapter.load(tmp_path, "cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "swin"}))
    with pytest.raises(ValueError, match="ViT classifiers"):
        task_of_model(tmp_path)


def test_vit_synth_recipe_round_trips_through_init_model(tmp_path: Path) -> None:
    adapter = ViTAdapter.load(write_random_model("vit-synth", LABELS, tmp_path, seed=3), "cpu")
    assert type(adapter.model).__name__ == "ViTForImageClassification" and adapter.num_blocks == 4
    assert adapter.input_size == (96, 96) and adapter.grid == (12, 12)
    assert adapter.preprocess_config.mean == (0.5, 0.5, 0.5) and adapter.preprocess_config.std == (0.5, 0.5, 0.5)
    assert adapter.family.name == "vit-tiny"  # a loaded checkpoint maps to its model type's published family
    assert adapter.forward(adapter.preprocess(images(1))).logits.shape == (1, 3)


def test_init_model_families_are_the_published_architectures() -> None:
    """Real sizes, checked on configs (no weights built): ViT-Ti/16 for the transformers and timm tiny
    families, OpenCLIP's own ViT-B-32 config."""
    import open_clip
    import timm

    for name in ("vit-tiny", "deit-tiny"):
        config = build_config(name, LABELS)
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.image_size,
                config.patch_size) == (192, 12, 3, 224, 16)
    assert build_config("vit-msn-small", LABELS).hidden_size == 384
    assert VIT_FAMILIES["deit-tiny"].builder == "DeiTForImageClassificationWithTeacher"
    assert timm.is_model(VIT_FAMILIES["timm-vit-tiny"].builder)
    assert open_clip.get_model_config(VIT_FAMILIES["openclip-vit-b-32"].builder)["vision_cfg"]["width"] == 768
    with pytest.raises(ValueError, match="not a transformers one"):
        build_config("timm-vit-tiny", LABELS)
