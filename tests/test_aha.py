"""AHA (METHODS.md 3d): the differentiable sort, the soft deletion curves against the pipeline's hard ones, a
short training run on a toy model whose evidence is one known region, test-time refinement, and the refusal
of a model the explainer was not trained for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from eive_audit.pipeline.config import FaithfulnessConfig
from eive_audit.pipeline.metrics.faithfulness import deletion_insertion
from eive_audit.pipeline.models.aha import (AhaDecoder, Architecture, ExplainerMismatch, LossSettings, aha_loss,
                                           as_map, from_floor, gumbel_sinkhorn, load_explainer, refine, save_explainer,
                                           soft_masks, weights_fingerprint)
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.train_explainer import training_step

SIDE, GRID = 32, (8, 8)
REGION = (slice(0, 16), slice(0, 16))  # the toy model's evidence: the top-left quarter
LOSS = LossSettings(percentiles=16, iterations=30, peak_weight=0.0025, reference="mean", blur_sigma=10.0, tau=0.3)


def hard_permutation(values: torch.Tensor) -> torch.Tensor:
    """The 0/1 permutation [K, d, d] putting cell i at its rank in the descending (stable) sort."""
    k, d = values.shape
    rank = values.argsort(dim=-1, descending=True, stable=True).argsort(-1)
    return F.one_hot(rank, d).float()


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 30), tau=st.floats(0.3, 2.0), noisy=st.booleans(), seed=st.integers(0, 2**16))
def test_gumbel_sinkhorn_rows_and_columns_sum_to_one(d: int, tau: float, noisy: bool, seed: int) -> None:
    """At the schedule's temperatures, noise included: columns are normalised last, so they sum to 1 exactly;
    rows converge, slowest where the noise makes a plan nearly degenerate (measured over 300 draws: within
    0.011 of 1 at 100 iterations, 0.001 at 1000)."""
    values = torch.rand(3, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    values = (values - values.amin(-1, keepdim=True)) / (values.amax(-1, keepdim=True) - values.amin(-1, keepdim=True))
    errors = []
    for iterations in (30, 1000):
        generator = torch.Generator().manual_seed(seed) if noisy else None  # the same noise for both
        plan = gumbel_sinkhorn(values, tau, iterations, generator)
        assert plan.shape == (3, d, d) and bool((plan >= 0).all())
        torch.testing.assert_close(plan.sum(1), torch.ones(3, d, dtype=plan.dtype), atol=1e-9, rtol=0)
        errors.append(float((plan.sum(2) - 1).abs().max()))
    assert errors[0] < 0.15 and errors[1] < 5e-3 and errors[1] <= errors[0] + 1e-12, errors


def on_anchors(d: int, seed: int, k: int = 1) -> torch.Tensor:
    """k rows of d distinct values, each a shuffle of the anchors linspace(0, 1, d): neighbours in the sort
    are 1 / (d - 1) apart, so their costs differ by about (1 / (d - 1))^2, the scale a temperature is hard at."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(d, generator=generator) for _ in range(k)]).double() / (d - 1)


@settings(max_examples=20, deadline=None)
@given(d=st.integers(4, 64), seed=st.integers(0, 2**16))
def test_gumbel_sinkhorn_approaches_the_hard_sort_as_the_temperature_falls(d: int, seed: int) -> None:
    values = on_anchors(d, seed)
    hard = hard_permutation(values)
    scale = (1 / (d - 1)) ** 2
    distance = [float((gumbel_sinkhorn(values, c * scale, 200) - hard).abs().sum()) for c in (30, 3, 0.3, 0.03)]
    assert all(a > b for a, b in zip(distance, distance[1:])), distance
    assert distance[-1] < 1e-3
    assert torch.equal(gumbel_sinkhorn(values, 0.03 * scale, 200).argmax(-1), hard.argmax(-1))


def test_soft_masks_of_a_hard_permutation_are_the_pipelines_step_masks() -> None:
    values = torch.rand(2, 20, generator=torch.Generator().manual_seed(1))
    fractions = torch.linspace(0, 1, 6)
    top, bottom = soft_masks(hard_permutation(values), fractions)
    rank = values.argsort(-1, descending=True).argsort(-1)  # 0 = most relevant
    counts = torch.round(fractions * 20)
    assert torch.equal(top.bool(), rank[:, None, :] < counts[None, :, None])
    assert torch.equal(bottom.bool(), rank[:, None, :] >= 20 - counts[None, :, None])


class Toy:
    """A classifier whose evidence is one region: p(class 0) = sigmoid(3 * mean of channel 0 over REGION - 2);
    as a detector with one query whose box is the whole image (the classification audit's form)."""

    def predict(self, pixels: torch.Tensor, mask: torch.Tensor, graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(not graph):
            p = torch.sigmoid(3 * pixels[:, 0, REGION[0], REGION[1]].mean((1, 2)) - 2)
            probs = torch.stack([p, 1 - p], -1)[:, None]
            return probs, torch.tensor([0.5, 0.5, 1.0, 1.0]).expand(len(pixels), 1, 4)


def toy_images(n: int, seed: int) -> torch.Tensor:
    """Noise images with a bright top-left quarter (the evidence), so the toy says class 0 for each."""
    pixels = 0.5 * torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    pixels[:, :, REGION[0], REGION[1]] += 1.5
    return pixels


def toy_targets(n: int) -> Targets:
    index = torch.arange(n)
    return Targets(index, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                   torch.tensor([0.5, 0.5, 1.0, 1.0]).expand(n, 4))


def toy_score(pixels: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    probs, _ = Toy().predict(pixels, mask, graph=True)
    return probs[:, 0].gather(-1, label[:, None])[:, 0]


def mean_reference(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.mean((2, 3), keepdim=True).expand_as(pixels)


def hard_aucs(maps: torch.Tensor, pixels: torch.Tensor, steps: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's deletion and insertion AUC of grid maps [K, 8, 8] on the toy (mean baseline)."""
    mask = torch.ones(len(pixels), SIDE, SIDE, dtype=torch.long)
    result = deletion_insertion(Toy().predict, pixels, mask, maps, toy_targets(len(pixels)),
                                FaithfulnessConfig(steps=steps, baseline="mean"))
    return result.deletion_auc, result.insertion_auc


def test_the_soft_aucs_approach_the_pipelines_hard_aucs_as_the_temperature_falls() -> None:
    pixels = toy_images(4, seed=0)
    mask = torch.ones(4, SIDE, SIDE, dtype=torch.long)
    cells = on_anchors(64, seed=2, k=4).float().view(4, *GRID)
    dense = F.interpolate(cells[:, None], size=(SIDE, SIDE), mode="nearest")[:, 0]  # pools back to `cells`
    deletion, insertion = hard_aucs(cells, pixels)
    gaps = []
    for c in (3, 0.3, 0.03):  # above, both plans are near uniform
        tau = c / 63 ** 2
        soft = aha_loss(dense, pixels, mask, mean_reference(pixels), toy_targets(4), toy_score, GRID, tau,
                        LossSettings(16, 100, 0.0, "mean", 10.0, tau))
        gaps.append(float((soft.deletion - deletion).abs().max() + (soft.insertion - insertion).abs().max()))
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-4, gaps


def toy_decoder(seed: int) -> AhaDecoder:
    torch.manual_seed(seed)
    return AhaDecoder(Architecture("classify", 3, 2, 2, hidden=16, upsamplings=2))


def toy_inputs(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The toy's features: its input pooled to the 8 x 8 grid (as a ViT's patch tokens lie on theirs)."""
    return F.adaptive_avg_pool2d(pixels, GRID), F.one_hot(toy_targets(len(pixels)).label, 2).float()


def test_a_short_training_run_puts_the_map_on_the_evidence_and_beats_random_maps() -> None:
    decoder = toy_decoder(0)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    for step in range(60):
        pixels = toy_images(4, seed=100 + step)
        features, condition = toy_inputs(pixels)
        training_step(decoder, optimizer, features, condition, pixels, torch.ones(4, SIDE, SIDE, dtype=torch.long),
                      mean_reference(pixels), toy_targets(4), toy_score, (4 + step % 5, 4 + step % 5),
                      1.0 * 0.3 ** (step / 59), LOSS, torch.Generator().manual_seed(step), clip_norm=1.0)
    pixels = toy_images(8, seed=7)
    with torch.no_grad():
        maps = as_map(decoder(*toy_inputs(pixels)[:1], torch.arange(8), toy_inputs(pixels)[1], (SIDE, SIDE)))
    grid_maps = from_floor(F.adaptive_avg_pool2d(maps[:, None], GRID)[:, 0], torch.ones(8, *GRID, dtype=torch.bool))
    on_evidence = grid_maps[:, :4, :4].sum((1, 2)) / grid_maps.sum((1, 2))  # the evidence's cells
    assert float(on_evidence.min()) > 0.6, on_evidence  # a quarter of the image: 0.25 for a flat map
    random_maps = torch.rand(8, *GRID, generator=torch.Generator().manual_seed(3))
    (deletion, insertion), (random_deletion, random_insertion) = hard_aucs(grid_maps, pixels), hard_aucs(random_maps, pixels)
    assert float(deletion.mean()) < float(random_deletion.mean()) - 0.1
    assert float(insertion.mean()) > float(random_insertion.mean()) + 0.1


def test_refinement_lowers_the_loss_of_the_image_it_refines() -> None:
    pixels, mask = toy_images(2, seed=5), torch.ones(2, SIDE, SIDE, dtype=torch.long)
    decoder = toy_decoder(1)  # untrained: refinement has something to correct
    with torch.no_grad():
        logits = decoder(*toy_inputs(pixels)[:1], torch.arange(2), toy_inputs(pixels)[1], (SIDE, SIDE))
    reference, targets = mean_reference(pixels), toy_targets(2)

    def loss_of(values: torch.Tensor) -> torch.Tensor:
        return aha_loss(as_map(values), pixels, mask, reference, targets, toy_score, GRID, LOSS.tau, LOSS,
                        torch.Generator().manual_seed(0)).total

    refined = refine(logits, pixels, mask, reference, targets, toy_score, GRID, LOSS, steps=5, lr=0.5)
    assert float(loss_of(refined)) < float(loss_of(logits)) - 0.05
    assert not refined.requires_grad


def test_an_explainer_refuses_a_model_it_was_not_trained_for(tmp_path) -> None:
    trained_for, other = toy_decoder(0), toy_decoder(1)  # any two modules with different weights
    save_explainer(tmp_path / "aha", toy_decoder(2), LOSS, weights_fingerprint(trained_for), "toy")
    decoder, loss = load_explainer(tmp_path / "aha", trained_for)
    assert loss == LOSS and weights_fingerprint(decoder) == weights_fingerprint(toy_decoder(2))
    with pytest.raises(ExplainerMismatch, match="trained for another model"):
        load_explainer(tmp_path / "aha", other)
