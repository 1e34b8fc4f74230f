"""iba (reconstructed) and the grad-cam package's Grad-CAM / Score-CAM on tiny random-init transformers, timm
(register tokens) and OpenCLIP ViTs: the map contract, batching, weights and hooks as they were (after errors
too), Grad-CAM / Score-CAM equal to the package run by its own ViT recipe on the library's model, and IBA
against a slow per-target, per-block reference and the documented fusions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_vit_explainers import BATCH_INDEX, LABELS, check_map_contract, explain, hooks, targets_of
from test_vit_models import images, write_tiny_models

from eive_audit.explainers import iba as iba_module
from eive_audit.explainers import score_cam as score_cam_module
from eive_audit.pipeline.config import IbaSettings, ScoreCamSettings
from eive_audit.pipeline.models.vit import ViTAdapter

KINDS = ("vit", "timm", "open_clip")
NAMES = ("iba", "grad-cam", "score-cam")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("vit_baselines"), KINDS)


@pytest.fixture(scope="module")
def adapters(dirs: dict[str, Path]) -> dict[str, ViTAdapter]:
    return {kind: ViTAdapter.load(path, "cpu") for kind, path in dirs.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_maps_are_non_negative_finite_on_the_grid_and_batched_equals_per_image(
        adapters: dict[str, ViTAdapter], kind: str, name: str) -> None:
    check_map_contract(adapters[kind], name, atol=1e-5)
    assert all(p.requires_grad for p in adapters[kind].model.parameters()), "weights as they were"


@pytest.mark.parametrize("name", NAMES)
def test_an_error_leaves_no_hook_and_the_weights_as_they_were(adapters: dict[str, ViTAdapter], name: str) -> None:
    """A caller's own gradient on a weight survives (the package's zero_grad would clear it), every weight
    still requires grad, and the package's hooks are gone although its context manager would have
    swallowed this IndexError."""
    adapter = adapters["timm"]
    weight = next(adapter.model.parameters())
    mine = torch.ones_like(weight)
    weight.grad = mine
    try:
        with pytest.raises((IndexError, RuntimeError)):
            explain(adapter, name, images(2), targets_of([0, 1], [0, 7]))  # no label 7
        assert hooks(adapter) == 0 and weight.grad is mine
        explain(adapter, name, images(2), targets_of([0, 1], [0, 1]))
        assert weight.grad is mine and all(p.requires_grad for p in adapter.model.parameters())
    finally:
        weight.grad = None
    assert all(p.grad is None for p in adapter.model.parameters()) and hooks(adapter) == 0


def test_no_targets_give_no_maps(adapters: dict[str, ViTAdapter]) -> None:
    for name in NAMES:
        assert explain(adapters["vit"], name, images(2), targets_of([], [])).shape == (0, 4, 4)


class _HFLogits(nn.Module):
    """The package's recipe for a transformers classifier: a module returning `.logits`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits


def package_reference(kind: str, path: Path, cam_name: str, pixels: torch.Tensor,
                      labels: list[int]) -> torch.Tensor:
    """The package's CAM as its ViT tutorial runs it, on a fresh copy of the library's own model: target the
    last block's first LayerNorm, reshape by dropping the prefix tokens onto the 4 x 4 grid."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    native = ViTAdapter.load(path, "cpu").model
    module, layer, prefix = {
        "vit": lambda: (_HFLogits(native), native.vit.layers[-1].layernorm_before, 1),
        "timm": lambda: (native, native.blocks[-1].norm1, native.num_prefix_tokens),
        "open_clip": lambda: (native, native.visual.transformer.resblocks[-1].ln_1, 1),
    }[kind]()

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, prefix:].reshape(tokens.shape[0], 4, 4, -1).permute(0, 3, 1, 2)

    cam = getattr(pytorch_grad_cam, cam_name)(module, [layer], reshape_transform=reshape)
    try:
        cam.batch_size = 7  # Score-CAM: batches of masked images that do not divide the 32 channels
        return torch.from_numpy(cam(pixels, [ClassifierOutputTarget(label) for label in labels]))
    finally:
        cam.activations_and_grads.release()


@pytest.mark.parametrize(("kind", "name", "cam_name"), [(kind, "grad-cam", "GradCAM") for kind in KINDS]
                         + [("timm", "score-cam", "ScoreCAM")])  # Score-CAM shares the wrapper; it is slow
def test_cams_equal_the_package_on_the_library_model(adapters: dict[str, ViTAdapter], dirs: dict[str, Path],
                                                     kind: str, name: str, cam_name: str) -> None:
    """Our wrapper (the adapter's primitives as a module, prefix tokens counted by the family, rows per
    target) does not distort the package's map: area-pooled onto the grid, it is ours."""
    adapter, pictures = adapters[kind], images(3)
    ours = explain(adapter, name, pictures, targets_of(BATCH_INDEX, LABELS), ScoreCamSettings(batch_size=5)
                   if name == "score-cam" else None)
    pixels = adapter.preprocess(pictures).pixel_values[BATCH_INDEX]
    theirs = package_reference(kind, dirs[kind], cam_name, pixels, LABELS)
    torch.testing.assert_close(ours, F.interpolate(theirs[:, None], size=(4, 4), mode="area")[:, 0], rtol=0, atol=1e-4)


def test_score_cam_in_memory_bounded_calls_equals_one_call_and_prints_no_progress(
        adapters: dict[str, ViTAdapter], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    adapter, pictures, targets = adapters["open_clip"], images(3), targets_of(BATCH_INDEX, LABELS)
    whole = explain(adapter, "score-cam", pictures, targets)
    monkeypatch.setattr(score_cam_module, "MASKED_BYTES", 1)  # one row per package call
    torch.testing.assert_close(explain(adapter, "score-cam", pictures, targets), whole)
    assert "it/s" not in capfd.readouterr().err


def slow_iba(adapter: ViTAdapter, pictures: list[torch.Tensor], pairs: list[tuple[int, int]],
             first_block: int) -> torch.Tensor:
    """The reference: per (image, label) target and per block, alone, from the adapter's primitives: the
    block maps [L', K, 16] (relevance from a per-token loop over the full-length sequence of copies,
    attention from the block's own logit's gradient), before fusion."""
    prefix, per_target = adapter.n_prefix, []
    for image, label in pairs:
        record = adapter.record(adapter.preprocess([pictures[image]]))
        blocks = []
        for tokens, attention in list(zip(record.tokens, record.output.attentions))[first_block:]:
            semantic = torch.stack([adapter.class_probs(adapter.head(tokens[:, i:i + 1].expand_as(tokens)))[0, label]
                                    for i in range(prefix, tokens.shape[1])])
            (grad,) = torch.autograd.grad(adapter.head(tokens)[0, label], attention, retain_graph=True)
            readout = adapter.readout(attention.shape[-1])
            weighted = (readout @ (grad * attention)[0].clamp(min=0).mean(0))[prefix:]
            block = (semantic * weighted).detach()
            blocks.append(block / block.sum())
        per_target.append(torch.stack(blocks))
    return torch.stack(per_target, 1)  # [L', K, 16]


@pytest.mark.parametrize("kind", KINDS)
def test_iba_equals_a_slow_per_target_per_block_reference(adapters: dict[str, ViTAdapter], kind: str) -> None:
    adapter, pictures = adapters[kind], images(3)
    blocks = slow_iba(adapter, pictures, list(zip(BATCH_INDEX, LABELS)), 0)
    expected = {"mean": blocks.mean(0), "max": blocks.amax(0), "product": blocks.prod(0).sqrt()}  # 2 blocks
    for fusion, fused in expected.items():
        ours = explain(adapter, "iba", pictures, targets_of(BATCH_INDEX, LABELS), IbaSettings(fusion=fusion))
        torch.testing.assert_close(ours, fused.view(-1, 4, 4), rtol=1e-4, atol=1e-7)


def test_iba_fusions_and_first_block(adapters: dict[str, ViTAdapter]) -> None:
    """From the last block alone every fusion is that block's normalised map; a first block past the last is
    refused; the product is zero wherever one block is; max >= mean."""
    adapter, pictures, targets = adapters["timm"], images(3), targets_of(BATCH_INDEX, LABELS)
    last = [explain(adapter, "iba", pictures, targets, IbaSettings(fusion=f, first_block=1))
            for f in ("mean", "product", "max")]
    torch.testing.assert_close(last[0], last[1])
    torch.testing.assert_close(last[0], last[2])
    torch.testing.assert_close(last[0].flatten(1).sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="first_block 2"):
        explain(adapter, "iba", pictures, targets, IbaSettings(first_block=2))
    blocks = torch.tensor([[[0.0, 0.5, 0.5]], [[0.2, 0.2, 0.6]]])  # 2 blocks, 1 target, 3 cells
    torch.testing.assert_close(iba_module.fuse(blocks, "product"), torch.tensor([[0.0, 0.1 ** 0.5, 0.3 ** 0.5]]))
    assert bool((iba_module.fuse(blocks, "max") >= iba_module.fuse(blocks, "mean")).all())


@pytest.mark.parametrize("kind", KINDS)
def test_iba_gradient_relevance_is_gradient_times_token_of_the_mean_pooled_logit(
        adapters: dict[str, ViTAdapter], kind: str) -> None:
    """relevance="gradient" per block: ReLU(Z_i . d s / d zbar) / N with s the head on the token mean: the
    block map's relevance term, checked against the last block read off by hand."""
    adapter, pictures = adapters[kind], images(2)
    targets = targets_of([0, 1], [2, 1])
    record = adapter.record(adapter.preprocess(pictures))
    tokens = record.tokens[-1]
    ours = iba_module.gradient_relevance(adapter, tokens, targets)
    for k, (image, label) in enumerate([(0, 2), (1, 1)]):
        mean = tokens[image].mean(0).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(adapter.head(mean[None, None].expand(1, tokens.shape[1], -1))[0, label], mean)
        expected = (tokens[image].detach() @ grad / tokens.shape[1])[adapter.n_prefix:].clamp(min=0)
        torch.testing.assert_close(ours[k], expected, rtol=1e-4, atol=1e-7)
    maps = explain(adapter, "iba", pictures, targets, IbaSettings(relevance="gradient"))
    assert maps.shape == (2, 4, 4) and bool((maps >= 0).all()) and bool(torch.isfinite(maps).all())


@pytest.mark.parametrize("kind", ["timm", "open_clip"])
def test_baselines_run_under_the_cuda_autocast_of_the_adapter(adapters: dict[str, ViTAdapter], kind: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the adapter runs in bfloat16 autocast (the CPU's stands in): the package hands activations to
    numpy, which has no bfloat16, so the reshape casts them."""
    adapter = adapters[kind]
    monkeypatch.setattr(adapter, "autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    for name in NAMES:
        maps = explain(adapter, name, images(2), targets_of([0, 1], [1, 2]))
        assert maps.dtype == torch.float32 and bool(torch.isfinite(maps).all()) and bool((maps >= 0).all())
