"""Faithfulness of instance maps: deletion and insertion AUC (METHODS.md section 4), batched.

Cells of the map's grid are ranked by saliency; at K + 1 fractions 0, 1/K, ..., 1 of the image's valid
cells, deletion replaces the top cells with a baseline and insertion starts from the baseline and
restores them. Each perturbed image is scored for the instance as the best over all queries of
IoU(query box, original box) * p(query, original class); the AUC is the trapezoid over the fractions.

Every perturbed image of every instance is built on the device and goes through the detector in large
batches: there is no per-instance loop around forwards. Perturbation happens on the preprocessed input,
so a cell is exactly the input block one attention token sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from eive_audit.pipeline.config import FaithfulnessConfig
from eive_audit.pipeline.models.boxes import paired_box_iou
from eive_audit.pipeline.models.perturb import baseline_images
from eive_audit.pipeline.models.targets import Targets, instance_scores

# (pixel_values [N, 3, H, W], pixel_mask [N, H, W]) -> (class probabilities [N, Q, C], boxes cxcywh [N, Q, 4])
DetectFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def step_masks(maps: torch.Tensor, valid: torch.Tensor, steps: int, budget: torch.Tensor | None = None) -> torch.Tensor:
    """Cells kept salient at each step: [K, steps + 1, h, w] booleans, the top round(f * budget) cells of
    each map at f = 0, 1/steps, ..., 1 (budget [K] defaults to the valid cells; ties broken by cell order,
    padding never chosen)."""
    k, h, w = maps.shape
    scores = maps.flatten(1).masked_fill(~valid.flatten(1), float("-inf"))
    rank = torch.empty_like(scores, dtype=torch.long)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank.scatter_(1, order, torch.arange(h * w, device=maps.device).expand(k, -1))
    n_valid = valid.flatten(1).sum(-1)  # [K]
    budget = n_valid if budget is None else torch.minimum(budget.to(n_valid.dtype), n_valid)
    fractions = torch.linspace(0, 1, steps + 1, device=maps.device)
    counts = torch.round(fractions[None, :] * budget[:, None]).long()  # [K, steps + 1]
    return (rank[:, None, :] < counts[:, :, None]).view(k, steps + 1, h, w)


def odam_scores(probs: torch.Tensor, boxes: torch.Tensor, label: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """ODAM's score: p of the best detection whose class is `label` and whose IoU with `box` exceeds 0.5
    (0 when there is none). Shapes as in `instance_scores`."""
    iou = paired_box_iou(box_convert(boxes.float(), "cxcywh", "xyxy"), box_convert(box.float(), "cxcywh", "xyxy")[:, None])
    p, predicted = probs.float().max(-1)
    return (p * ((predicted == label[:, None]) & (iou > 0.5))).amax(-1)


def _box_area_in_cells(box: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Area of normalised cxcywh boxes [K, 4] in grid cells of their images' valid region [K, h, w]."""
    rows = valid.any(-1).sum(-1)
    cols = valid.any(-2).sum(-1)
    return torch.round(box[:, 2] * cols * box[:, 3] * rows).clamp(min=1)


@dataclass(frozen=True)
class FaithfulnessResult:
    """Per instance [K]: deletion and insertion AUC; curves [K, steps + 1] at `fractions` [steps + 1]."""

    deletion_auc: torch.Tensor
    insertion_auc: torch.Tensor
    deletion_curve: torch.Tensor
    insertion_curve: torch.Tensor
    fractions: torch.Tensor


def deletion_insertion(detect: DetectFn, pixels: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor,
                       targets: Targets, config: FaithfulnessConfig) -> FaithfulnessResult:
    """Deletion and insertion curves of K maps [K, h, w] of one preprocessed batch (pixels [B, 3, H, W],
    mask [B, H, W]); all 2 * K * (steps + 1) perturbed images go through `detect` in chunks of batch_size."""
    k, h, w = maps.shape
    steps = config.steps
    fractions = torch.linspace(0, 1, steps + 1, device=pixels.device)
    if k == 0:
        empty = torch.zeros(0, device=pixels.device)
        return FaithfulnessResult(empty, empty, empty.view(0, steps + 1), empty.view(0, steps + 1), fractions)
    baseline = baseline_images(pixels, mask, config.baseline, config.blur_sigma, config.seed)
    valid = F.interpolate(mask[:, None].float(), size=(h, w))[:, 0].bool()[targets.batch_index]
    odam = config.protocol == "odam"
    budget = _box_area_in_cells(targets.box.float(), valid) if odam else None
    salient = step_masks(maps.to(pixels.device), valid, steps, budget).flatten(0, 1)  # [K * (steps + 1), h, w]
    score_fn = odam_scores if odam else instance_scores
    jobs = torch.arange(2 * salient.shape[0], device=pixels.device)  # first all deletions, then all insertions
    scores = torch.empty(len(jobs), device=pixels.device)
    for chunk in jobs.split(config.batch_size):
        cell = chunk % salient.shape[0]
        inst = cell // (steps + 1)
        image = targets.batch_index[inst]
        region = F.interpolate(salient[cell][:, None].float(), size=pixels.shape[-2:], mode="nearest").bool()
        deleting = (chunk < salient.shape[0])[:, None, None, None]
        kept, replaced = pixels[image], baseline[image]
        # Deletion swaps the salient region for the baseline; insertion shows only the salient region.
        perturbed = torch.where(region == deleting, replaced, kept)
        probs, boxes = detect(perturbed, mask[image])
        scores[chunk] = score_fn(probs, boxes, targets.label[inst], targets.box[inst])
    deletion, insertion = scores.view(2, k, steps + 1)
    if odam:  # as a fraction of the intact image's score, the first point of the deletion curve
        intact = deletion[:, :1].clamp(min=1e-6)
        deletion, insertion = deletion / intact, insertion / intact
    return FaithfulnessResult(torch.trapezoid(deletion, fractions, dim=-1), torch.trapezoid(insertion, fractions, dim=-1),
                              deletion, insertion, fractions)
