"""D-RISE (CVPR 2021, "Black-box explanation of object detectors via saliency maps"), METHODS.md 2.

N random masks: an s x s grid of cells kept with probability p, upsampled bilinearly to (s + 1) cells and
shifted by a random fraction of a cell (RISE's smooth masks). Each masked image (masked pixels become 0
after normalisation, the mean colour) goes through `model.predict`; the target is scored against every
query as IoU(box, target box) * cos(class probabilities, target class vector) * objectness, and the best
query counts. The map is the sum of the masks weighted by that score, pooled onto the attention grid.

Choices: the target class vector is the one-hot of the target's label (D-RISE's choice for detectors
that output labels; also defined for a missed GT box), so the cosine is p_c / |p|. Objectness is the
probability that the query holds any object: 1 - p(no-object) for DETR's softmax head, 1 - prod(1 - p_c)
for focal-loss (sigmoid) heads, which have no no-object class.
The weighted sum carries a floor of about p * (sum of the weights) on every cell, which the paper's
figures remove by min-max scaling; we subtract each map's minimum over its image's cells, so the floor is
not read as mass on the background by the localisation scores. A constant shift: the ranking of cells, and
so deletion / insertion, is exactly that of the raw sum.

All images' masked copies go through the detector in chunks of `batch_size` on the model's device; the
masks come from a seeded generator on the CPU, so a seed gives the same maps on any device and batch size
(up to float summation order).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from eive_audit.explainers._common import on_grid
from eive_audit.explainers.base import register
from eive_audit.pipeline.config import DriseSettings
from eive_audit.pipeline.models.boxes import paired_box_iou
from eive_audit.pipeline.models.detr import DetectorOutput, DetrAdapter
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets


def smooth_masks(cells: torch.Tensor, shifts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """RISE masks [n, H, W] in [0, 1] from binary cell grids [n, s, s] and shifts [n, 2] in [0, 1) of a cell:
    each grid upsampled to (s + 1) cells of ceil(H / s) x ceil(W / s) pixels, then cropped at its shift."""
    n, s, _ = cells.shape
    height, width = size
    cell_h, cell_w = math.ceil(height / s), math.ceil(width / s)
    up = F.interpolate(cells[:, None], size=((s + 1) * cell_h, (s + 1) * cell_w), mode="bilinear",
                       align_corners=False)[:, 0]
    dy = (shifts[:, 0] * cell_h).long()
    dx = (shifts[:, 1] * cell_w).long()
    rows = dy[:, None] + torch.arange(height, device=cells.device)  # [n, H]
    cols = dx[:, None] + torch.arange(width, device=cells.device)  # [n, W]
    return up[torch.arange(n, device=cells.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


def detection_similarity(probs: torch.Tensor, boxes: torch.Tensor, label: torch.Tensor, box: torch.Tensor,
                         sigmoid_classes: bool) -> torch.Tensor:
    """D-RISE's score of K targets in n detector outputs, best query: probs [n, Q, C], boxes [n, Q, 4] and
    box [K, 4] normalised cxcywh, label [K] -> [n, K]."""
    iou = paired_box_iou(box_convert(boxes.float(), "cxcywh", "xyxy")[:, None],
                         box_convert(box.float(), "cxcywh", "xyxy")[None, :, None])  # [n, K, Q]
    probs = probs.float()
    cosine = probs[..., label] / probs.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # [n, Q, K]
    objectness = 1 - (1 - probs).prod(-1) if sigmoid_classes else probs.sum(-1)  # [n, Q]
    return (iou * (cosine * objectness[..., None]).transpose(1, 2)).amax(-1)


@register("drise")
class DRise:
    """n_masks masks per image of a grid_size x grid_size cell grid, cells kept with keep_prob; forwards in
    chunks of batch_size; seed fixes the masks (`DriseSettings`, pipeline.config, validated there)."""

    name: ClassVar[str]

    def __init__(self, settings: DriseSettings) -> None:
        self.settings = settings

    def explain(self, model: DetrAdapter, batch: PixelBatch, outputs: DetectorOutput, targets: Targets) -> torch.Tensor:
        settings, (h, w) = self.settings, outputs.grid
        device = outputs.logits.device
        maps = torch.zeros(len(targets), h * w, device=device)
        if len(targets) == 0:
            return maps.view(0, h, w)
        generator = torch.Generator().manual_seed(settings.seed)
        s = settings.grid_size
        cells = (torch.rand(settings.n_masks, s, s, generator=generator) < settings.keep_prob).float().to(device)
        shifts = torch.rand(settings.n_masks, 2, generator=generator).to(device)
        pixels, pixel_mask = batch.pixel_values, batch.pixel_mask
        images = targets.batch_index.unique()
        jobs = torch.arange(len(images) * settings.n_masks, device=device)  # (image slot, mask) pairs
        for chunk in jobs.split(settings.batch_size):
            image, mask = images[chunk // settings.n_masks], chunk % settings.n_masks
            masks = smooth_masks(cells[mask], shifts[mask], tuple(pixels.shape[-2:]))
            probs, boxes = model.predict(pixels[image] * masks[:, None], pixel_mask[image])
            score = detection_similarity(probs, boxes, targets.label, targets.box, model.family.sigmoid_classes)
            score = score * (image[:, None] == targets.batch_index[None, :])  # a mask of image b explains b's targets
            maps += score.T @ F.interpolate(masks[:, None], size=(h, w), mode="area").flatten(1)
        valid = outputs.token_mask[targets.batch_index].flatten(1)
        return on_grid(maps - maps.masked_fill(~valid, float("inf")).amin(-1, keepdim=True), outputs, targets)
