"""Deletion / insertion on a toy detector whose evidence is known: its score is the mean brightness of one
region. A map on that region must beat a random and an inverted map; batching must not change a number."""

from __future__ import annotations

import pytest
import torch

from eive_audit.pipeline.metrics.faithfulness import FaithfulnessConfig, deletion_insertion, step_masks
from eive_audit.pipeline.models.targets import Targets

H = W = 32  # input pixels; grid 8 x 8 at stride 4
REGION = (slice(0, 16), slice(0, 16))  # the only evidence: the top-left quarter


def toy_detect(pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One query, two classes: p(class 0) = mean of channel 0 in REGION, box fixed at the image centre."""
    p0 = pixels[:, 0, REGION[0], REGION[1]].mean((1, 2)).clamp(0, 1)
    probs = torch.stack([p0, 1 - p0], -1)[:, None, :]
    boxes = torch.tensor([0.5, 0.5, 0.5, 0.5]).expand(len(pixels), 1, 4)
    return probs, boxes


def constant_detect(pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((len(pixels), 1, 2), 0.3), torch.tensor([0.5, 0.5, 0.5, 0.5]).expand(len(pixels), 1, 4)


@pytest.fixture()
def scene() -> tuple[torch.Tensor, torch.Tensor, Targets]:
    pixels = torch.zeros(2, 3, H, W)
    pixels[:, :, REGION[0], REGION[1]] = 1.0
    mask = torch.ones(2, H, W, dtype=torch.long)
    targets = Targets(batch_index=torch.tensor([0, 0, 0, 1]), query=torch.zeros(4, dtype=torch.long),
                      label=torch.zeros(4, dtype=torch.long), box=torch.tensor([[0.5, 0.5, 0.5, 0.5]] * 4))
    return pixels, mask, targets


def _maps() -> torch.Tensor:
    on_region = torch.zeros(8, 8)
    on_region[:4, :4] = 1.0
    on_region += 0.01 * torch.rand(8, 8, generator=torch.Generator().manual_seed(1))  # break ties
    random = torch.rand(8, 8, generator=torch.Generator().manual_seed(2))
    inverted = on_region.max() - on_region
    return torch.stack([on_region, random, inverted, on_region])


@pytest.mark.parametrize("baseline", ["mean", "blur", "noise"])
def test_the_true_evidence_map_wins_on_both_curves(scene, baseline: str) -> None:
    pixels, mask, targets = scene
    result = deletion_insertion(toy_detect, pixels, mask, _maps(), targets, FaithfulnessConfig(steps=16, baseline=baseline))
    deletion, insertion = result.deletion_auc, result.insertion_auc
    assert deletion[0] < deletion[1] < deletion[2], deletion  # region < random < inverted
    assert insertion[0] > insertion[1] > insertion[2], insertion
    torch.testing.assert_close(result.deletion_curve[:, 0], result.insertion_curve[:, -1])  # both are the intact image


def test_auc_of_a_constant_score_is_that_constant(scene) -> None:
    pixels, mask, targets = scene
    result = deletion_insertion(constant_detect, pixels, mask, _maps(), targets, FaithfulnessConfig(steps=7))
    torch.testing.assert_close(result.deletion_auc, torch.full((4,), 0.3))
    torch.testing.assert_close(result.insertion_auc, torch.full((4,), 0.3))


def test_batched_equals_one_instance_at_a_time(scene) -> None:
    pixels, mask, targets = scene
    maps = _maps()
    config = FaithfulnessConfig(steps=10, baseline="blur", batch_size=7)
    together = deletion_insertion(toy_detect, pixels, mask, maps, targets, config)
    for k in range(len(targets)):
        one = Targets(*(t[k:k + 1] for t in (targets.batch_index, targets.query, targets.label, targets.box)))
        alone = deletion_insertion(toy_detect, pixels, mask, maps[k:k + 1], one, FaithfulnessConfig(steps=10, batch_size=1000))
        torch.testing.assert_close(alone.deletion_auc, together.deletion_auc[k:k + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.insertion_auc, together.insertion_auc[k:k + 1], atol=1e-5, rtol=0)


def test_step_masks_grow_from_nothing_to_every_valid_cell() -> None:
    maps = torch.arange(12.0).view(1, 3, 4)
    valid = torch.ones(1, 3, 4, dtype=torch.bool)
    valid[0, :, 3] = False  # a padded column is never chosen
    masks = step_masks(maps, valid, steps=3)
    assert masks.shape == (1, 4, 3, 4)
    assert masks[0].flatten(1).sum(-1).tolist() == [0, 3, 6, 9]
    assert masks[0, 1].nonzero().tolist() == [[2, 0], [2, 1], [2, 2]]  # the three highest valid cells
    assert not masks[0, -1, :, 3].any()


def test_odam_protocol_steps_over_the_object_area_and_scores_relative(scene) -> None:
    pixels, mask, targets = scene
    config = FaithfulnessConfig(steps=8, baseline="noise", protocol="odam")
    result = deletion_insertion(toy_detect, pixels, mask, _maps(), targets, config)
    torch.testing.assert_close(result.deletion_curve[:, 0], torch.ones(4))  # relative to the intact image
    assert result.deletion_auc[0] < result.deletion_auc[1] < result.deletion_auc[2]
    assert result.insertion_auc[0] > result.insertion_auc[2]
    # The box covers 4 x 4 = 16 of the 64 cells: the last step perturbs exactly the object's area.
    masks = step_masks(_maps()[:1], torch.ones(1, 8, 8, dtype=torch.bool), 8, budget=torch.tensor([16]))
    assert masks[0].flatten(1).sum(-1).tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    with pytest.raises(ValueError, match="noise"):
        FaithfulnessConfig(protocol="odam")
