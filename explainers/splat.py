"""The splat of METHODS.md 1b: multi-scale deformable attention as a map on the finest level's grid.

A deformable query reads each sampling point by bilinear interpolation of its level's value map
(`grid_sample`, align_corners=False, zero padding). Spreading the point's attention weight onto the same 4
neighbouring cells with the same bilinear coefficients gives, for every value token, exactly the coefficient
with which it enters the query's output: the dense attention row the model never forms. Levels are then
merged by density onto the finest grid, so a level's mass stays its mass.

Everything is one scatter-add over all levels on the tensors' device, vectorised over any leading dims.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# The 4 bilinear neighbours of a point as (dx, dy) offsets from its floor cell.
_DX = (0, 1, 0, 1)
_DY = (0, 0, 1, 1)


def splat(weights: torch.Tensor, locations: torch.Tensor, level_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Token coefficients [..., S] (S = sum of h_v * w_v, levels in order, row-major cells) from attention
    weights [..., Lv, P] and sampling locations [..., Lv, P, 2] ((x, y) in [0, 1] of each padded level map).

    A point at u lands at x = u_x * w_v - 0.5, y = u_y * h_v - 0.5 in cell units; its weight goes to the cells
    (floor(x) + dx, floor(y) + dy) with bilinear coefficients, and neighbours outside the map are dropped, as
    grid_sample's zero padding drops them. So the result sums to at most the weights' sum.
    """
    device = weights.device
    weights, locations = weights.float(), locations.float()
    shapes = torch.tensor(level_shapes, device=device)  # [Lv, 2] (h, w)
    heights, widths = shapes[:, 0, None, None], shapes[:, 1, None, None]  # broadcast over [..., Lv, P, 4]
    starts = torch.cumsum(shapes.prod(1), 0) - shapes.prod(1)
    x = locations[..., 0] * shapes[:, 1, None] - 0.5  # [..., Lv, P]
    y = locations[..., 1] * shapes[:, 0, None] - 0.5
    x0, y0 = x.floor(), y.floor()
    dx = torch.tensor(_DX, device=device, dtype=x.dtype)
    dy = torch.tensor(_DY, device=device, dtype=x.dtype)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    coef = (dx * fx + (1 - dx) * (1 - fx)) * (dy * fy + (1 - dy) * (1 - fy))  # [..., Lv, P, 4]
    xs, ys = (x0[..., None] + dx).long(), (y0[..., None] + dy).long()
    inside = (xs >= 0) & (xs < widths) & (ys >= 0) & (ys < heights)
    index = starts[:, None, None] + ys.clamp(min=0).minimum(heights - 1) * widths + xs.clamp(min=0).minimum(widths - 1)
    values = weights[..., None] * coef * inside
    lead = weights.shape[:-2]
    n_tokens = int(shapes.prod(1).sum())
    out = torch.zeros(math.prod(lead), n_tokens, device=device)
    out.scatter_add_(1, index.reshape(out.shape[0], -1), values.reshape(out.shape[0], -1))
    return out.view(*lead, n_tokens)


def merge_levels(tokens: torch.Tensor, level_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Token coefficients [..., S] over all levels -> one map [..., h * w] on the finest level's grid.

    Each level map is upsampled bilinearly to the finest grid and divided by the ratio of cell counts
    (the stride ratio squared), turning mass per coarse cell into density per fine cell: the sum is kept
    exactly for integer ratios, within rounding of the grids otherwise.
    """
    height, width = max(level_shapes, key=lambda hw: hw[0] * hw[1])
    levels = tokens.split([h * w for h, w in level_shapes], dim=-1)
    merged = tokens.new_zeros(*tokens.shape[:-1], height * width)
    for (h, w), level in zip(level_shapes, levels):
        up = F.interpolate(level.reshape(-1, 1, h, w), size=(height, width), mode="bilinear", align_corners=False)
        merged += up.view(merged.shape) * (h * w / (height * width))
    return merged
