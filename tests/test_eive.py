"""EIVE: shapes, non-negativity, padding, agreement with a slow per-instance reference, and the registry."""

from __future__ import annotations

import pytest
import torch

from eive_audit.explainers import available, get_explainer, register
from eive_audit.explainers.eive import FUSIONS
from eive_audit.pipeline.config import EiveSettings
from eive_audit.pipeline.models.boxes import paired_box_iou
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.models.families import FAMILIES, build_config
from eive_audit.pipeline.models.preprocess import PreprocessConfig
from eive_audit.pipeline.models.targets import Targets


@pytest.fixture(scope="module")
def forward() -> tuple:
    torch.manual_seed(0)
    model = FAMILIES["conditional-detr-small"].model_class(build_config("conditional-detr-small", ["a", "b", "c"]))
    adapter = DetrAdapter(model, PreprocessConfig(96, 160), torch.device("cpu"))
    # Different aspect ratios, so the batch is padded and some grid cells are padding.
    images = [torch.randint(0, 255, (3, 96, 160), dtype=torch.uint8), torch.randint(0, 255, (3, 120, 96), dtype=torch.uint8)]
    batch = adapter.preprocess(images)
    with torch.inference_mode():
        outputs = adapter.forward(batch)
    q = torch.tensor([0, 5, 19, 3, 7])
    b = torch.tensor([0, 0, 0, 1, 1])
    targets = Targets(batch_index=b, query=q, label=torch.tensor([0, 1, 2, 0, 2]), box=outputs.boxes[b, q].float())
    return adapter, batch, outputs, targets


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("track", [True, False])
def test_maps_have_grid_shape_are_non_negative_and_zero_on_padding(forward: tuple, fusion: str, track: bool) -> None:
    adapter, batch, outputs, targets = forward
    maps = get_explainer("eive", EiveSettings(fusion=fusion, track=track)).explain(adapter, batch, outputs, targets)
    assert maps.shape == (len(targets), *outputs.grid)
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    padding = ~outputs.token_mask[targets.batch_index]
    assert padding.any(), "the fixture must contain padding"
    assert (maps[padding] == 0).all()
    assert (maps.flatten(1).sum(-1) > 0).all()


def _slow_reference(outputs, targets: Targets, fusion: str) -> torch.Tensor:
    """One instance at a time, straight from METHODS.md 1a: head-mean row of the final query, normalised."""
    maps = []
    for b, q in zip(targets.batch_index.tolist(), targets.query.tolist()):
        valid = outputs.token_mask[b].flatten().float()
        rows = [outputs.cross_attentions[layer, b, :, q, :].mean(0) * valid for layer in range(outputs.cross_attentions.shape[0])]
        rows = [r / r.sum() for r in rows]
        fused = rows[-1] if fusion == "last" else torch.stack(rows).mean(0)
        maps.append(fused.view(outputs.grid))
    return torch.stack(maps)


@pytest.mark.parametrize("fusion", ["last", "mean"])
def test_vectorised_equals_per_instance_reference(forward: tuple, fusion: str) -> None:
    adapter, batch, outputs, targets = forward
    fast = get_explainer("eive", EiveSettings(fusion=fusion, track=False)).explain(adapter, batch, outputs, targets)
    torch.testing.assert_close(fast, _slow_reference(outputs, targets, fusion), atol=1e-6, rtol=1e-5)


def test_clhcf_peak_lies_between_alpha_and_one(forward: tuple) -> None:
    # S = alpha * minmax(G) + (1 - alpha) * minmax(U * V): each term reaches 1 somewhere, so max S is in [alpha, 1].
    adapter, batch, outputs, targets = forward
    peaks = get_explainer("eive", EiveSettings(fusion="clhcf", alpha=0.3)).explain(adapter, batch, outputs, targets).flatten(1).amax(-1)
    assert (peaks >= 0.7 - 1e-6).all() and (peaks <= 1 + 1e-6).all()


def test_no_targets_gives_no_maps(forward: tuple) -> None:
    adapter, batch, outputs, _ = forward
    empty = Targets(*(torch.zeros(0, dtype=torch.long) for _ in range(3)), box=torch.zeros(0, 4))
    assert get_explainer("eive").explain(adapter, batch, outputs, empty).shape == (0, *outputs.grid)


def test_paired_iou_by_hand() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0]])
    torch.testing.assert_close(paired_box_iou(a, b), torch.tensor([1 / 7, 0.0]))  # 1 / (4 + 4 - 1)


def test_registry_rejects_duplicates_and_unknown_names() -> None:
    assert "eive" in available()
    with pytest.raises(ValueError, match="already registered"):
        register("eive")(type("Other", (), {}))
    with pytest.raises(ValueError, match="unknown explainer"):
        get_explainer("nope")
    with pytest.raises(ValueError, match="fusion"):
        get_explainer("eive", EiveSettings(fusion="median"))
    assert get_explainer("eive").needs.gradients is False
