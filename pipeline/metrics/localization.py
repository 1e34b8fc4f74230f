"""Localisation scores of instance maps against boxes (METHODS.md section 4), vectorised over instances.

A map is read as piecewise constant on its grid: each cell holds its value over its whole area, so the
mass inside a box is exact (cells cut by the box edge count by the fraction they overlap) and no map is
ever upsampled. Boxes come in grid units: `pipeline.geometry.Geometry.to_grid` converts from original-image
pixels.
"""

from __future__ import annotations

import torch


def box_coverage(boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each grid cell covered by each box: [K, 4] grid-unit xyxy -> [K, h, w] in [0, 1]."""
    h, w = grid
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32)
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32)
    cover_x = (torch.minimum(boxes[:, 2:3], xs + 1) - torch.maximum(boxes[:, 0:1], xs)).clamp(0, 1)
    cover_y = (torch.minimum(boxes[:, 3:4], ys + 1) - torch.maximum(boxes[:, 1:2], ys)).clamp(0, 1)
    return cover_y[:, :, None] * cover_x[:, None, :]


def localization_scores(maps: torch.Tensor, own_boxes: torch.Tensor, gt_index: torch.Tensor,
                        gt_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores of K maps of one image; NaN where a score is undefined.

    maps [K, h, w] non-negative; own_boxes [K, 4] the explained query's box; gt_index [K] the instance's
    GT box in gt_boxes [G, 4] (-1 for none); all boxes in grid units. Returns [K] tensors:
    mass_in_pred, mass_in_gt, mass_on_other_gt, peak_in_gt (1.0 / 0.0), compactness.
    """
    k, h, w = maps.shape
    total = maps.flatten(1).sum(-1)
    dist = maps / torch.where(total > 0, total, torch.ones_like(total))[:, None, None]  # any mass, however small
    nan = torch.full((k,), float("nan"), device=maps.device)
    own = box_coverage(own_boxes.float(), (h, w))
    gt_cov = box_coverage(gt_boxes.float().reshape(-1, 4), (h, w))  # [G, h, w]
    has_gt = gt_index >= 0
    mine = gt_cov[gt_index.clamp(min=0)] if len(gt_cov) else torch.zeros_like(own)
    mass_in_gt = torch.where(has_gt, (dist * mine).flatten(1).sum(-1), nan)

    peak = dist.flatten(1) >= dist.flatten(1).amax(-1, keepdim=True)  # ties: any peak cell may count
    peak_in_gt = torch.where(has_gt, (peak & (mine.flatten(1) > 0)).any(-1).float(), nan)

    if len(gt_cov):
        others = torch.arange(len(gt_cov), device=maps.device)[None, :] != gt_index[:, None]  # [K, G]
        other_cov = (gt_cov[None] * others[:, :, None, None]).amax(1)
        on_all = (dist * gt_cov.amax(0)).flatten(1).sum(-1)
        on_other = (dist * other_cov).flatten(1).sum(-1)
        mass_on_other_gt = torch.where(on_all > 0, on_other / on_all.clamp(min=1e-30), nan)
    else:
        mass_on_other_gt = nan

    centres_y, centres_x = torch.meshgrid(torch.arange(h, device=maps.device) + 0.5,
                                          torch.arange(w, device=maps.device) + 0.5, indexing="ij")
    peak_cell = dist.flatten(1).argmax(-1)
    py, px = centres_y.flatten()[peak_cell], centres_x.flatten()[peak_cell]
    sq_dist = (centres_y[None] - py[:, None, None]) ** 2 + (centres_x[None] - px[:, None, None]) ** 2
    half_diag_sq = ((own_boxes[:, 2:] - own_boxes[:, :2]) ** 2).sum(-1) / 4
    compactness = ((dist * sq_dist).flatten(1).sum(-1) / half_diag_sq.clamp(min=1e-12)).sqrt()

    valid = total > 0
    scores = {
        "mass_in_pred": (dist * own).flatten(1).sum(-1),
        "mass_in_gt": mass_in_gt,
        "mass_on_other_gt": mass_on_other_gt,
        "peak_in_gt": peak_in_gt,
        "compactness": compactness,
    }
    return {name: torch.where(valid, value, nan) for name, value in scores.items()}
