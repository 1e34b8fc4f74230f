"""AAJTS, attention-aware joint training (METHODS.md 1d, reconstructed): two losses on the decoder's
cross-attention, added to the detector's own set loss, that make EIVE's maps concentrated and stable.

For every Hungarian-matched (query, GT) pair of every decoder layer, the query's map (its cross-attention
row, head mean, padding zeroed) gives
- concentration L_in = 1 - share of the map's mass inside the GT box, the box rasterised on the attention
  grid as the localisation scores read it (cells cut by the edge count by the fraction covered);
- stability L_stab = 1 - cos(map_l, stopgrad(map_L)) for l < L, pairing layers by their GT object.

The pairs are the ones transformers' set loss matched: `capture_matches` records its matcher's calls, so
matching runs once per layer, with the family's own cost (softmax for DETR, focal for Conditional / DAB-DETR).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torchvision.ops import box_convert
from transformers import PreTrainedModel
from transformers.loss.loss_for_object_detection import HungarianMatcher

from eive_audit.pipeline.geometry import Geometry
from eive_audit.pipeline.metrics.localization import box_coverage
from eive_audit.pipeline.models.families import family_of
from eive_audit.pipeline.models.hooks import capture_outputs

DENSE_ONLY = "AAJTS needs dense cross-attention; deformable families not yet supported"

Match = list[tuple[torch.Tensor, torch.Tensor]]  # per image: (query indices, target indices), a matcher's output


@dataclass(frozen=True)
class Pairs:
    """Matched (query, GT) pairs of one decoder layer over a batch, sorted by (image, gt) so that the pairs of
    two layers line up by GT object: image [K], query [K], gt [K] (index into that image's targets)."""

    image: torch.Tensor
    query: torch.Tensor
    gt: torch.Tensor

    @classmethod
    def from_match(cls, match: Match, device: torch.device) -> "Pairs":
        image, query, gt = [], [], []
        for b, (queries, targets) in enumerate(match):
            order = targets.argsort()
            image.append(torch.full_like(targets, b))
            query.append(queries[order])
            gt.append(targets[order])
        return cls(*(torch.cat(parts).to(device) for parts in (image, query, gt)))


@dataclass
class JointLoss:
    """One batch's training loss: total = detection + lambda_in * concentration + lambda_stab * stability."""

    total: torch.Tensor
    detection: torch.Tensor
    concentration: torch.Tensor
    stability: torch.Tensor

    def logged(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "detection_loss": float(self.detection.detach()),
                "concentration_loss": float(self.concentration.detach()),
                "stability_loss": float(self.stability.detach())}


def require_dense_attention(model: PreTrainedModel) -> None:
    """Refuse a model whose decoder has no dense cross-attention matrix to constrain."""
    if family_of(model.config.model_type).deformable:
        raise ValueError(DENSE_ONLY)


@contextlib.contextmanager
def capture_matches() -> Iterator[list[Match]]:
    """Record, in call order, the output of every transformers HungarianMatcher call (the family matchers
    subclass it). The matcher is built inside the loss function on each call, so only a global module hook
    can see it; the hook is removed on exit, even on error."""
    calls: list[Match] = []

    def hook(module: nn.Module, _args: tuple, output: Match) -> None:
        if isinstance(module, HungarianMatcher):
            calls.append(output)

    handle = register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def layer_matches(calls: list[Match], num_layers: int) -> list[Match]:
    """The matches of each decoder layer, first to last, from one set loss's matcher calls.

    transformers' ImageLoss matches the final output first, then each auxiliary (intermediate-layer) output
    in layer order. Without auxiliary loss only the final output is matched; its pairs then stand for every
    layer, since a query keeps its index through the decoder."""
    if len(calls) == num_layers:
        return calls[1:] + calls[:1]
    if len(calls) == 1:
        return calls * num_layers
    raise RuntimeError(f"the set loss matched {len(calls)} times for {num_layers} decoder layers")


def gt_coverage(boxes: torch.Tensor, image_sizes: torch.Tensor, padded_size: tuple[int, int],
                grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each attention cell inside each GT box, [K, h, w].

    boxes [K, 4]: normalised cxcywh of their own (unpadded) image, as transformers' labels hold them, i.e.
    pixels of a 1 x 1 original resized to that image; image_sizes [K, 2]: (h, w) of that image in input
    pixels; padded_size (H, W) of the batch; grid (h, w).
    """
    corners = box_convert(boxes.float(), "cxcywh", "xyxy")
    coverage = [box_coverage(Geometry((1, 1), tuple(size.tolist()), padded_size, grid).to_grid(box[None]), grid)
                for box, size in zip(corners, image_sizes)]
    return torch.cat(coverage) if coverage else corners.new_zeros((0, *grid))


def concentration_loss(maps: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """1 - the share of each map's mass inside its box, [K]: 0 when all of it is inside, 1 when none is.
    maps [K, h, w] non-negative, coverage [K, h, w] in [0, 1]."""
    inside = (maps * coverage).flatten(1).sum(-1)
    return 1 - inside / maps.flatten(1).sum(-1).clamp(min=1e-12)


def stability_loss(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """1 - cosine between each map and its reference (the last layer's map of the same object), [K]. The
    reference is held fixed (stop-gradient) so earlier layers move toward the last one, not the reverse."""
    return 1 - F.cosine_similarity(maps.flatten(1), reference.detach().flatten(1), dim=-1)


def attention_losses(cross_attentions: tuple[torch.Tensor, ...] | torch.Tensor, pairs: list[Pairs],
                     labels: list[dict[str, torch.Tensor]], pixel_mask: torch.Tensor,
                     grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean concentration loss over every layer's pairs and mean stability loss over the layers before the
    last, each layer's pairs lined up with the last layer's by GT object.

    cross_attentions: per decoder layer [B, M, Q, h*w] post-softmax; pairs: per layer; labels: transformers'
    per-image targets; pixel_mask [B, H, W] (1 = real pixel)."""
    last = pairs[-1]
    for layer in pairs[:-1]:
        if not (torch.equal(layer.image, last.image) and torch.equal(layer.gt, last.gt)):
            raise ValueError("the decoder layers matched different GT objects (more objects than queries?)")
    zero = pixel_mask.new_zeros((), dtype=torch.float32)
    if len(last.gt) == 0:
        return zero, zero
    token_mask = F.interpolate(pixel_mask[:, None].float(), size=grid)[:, 0]  # as the audit crops padding
    image_sizes = torch.stack([pixel_mask.any(-1).sum(-1), pixel_mask.any(-2).sum(-1)], dim=-1)  # (h, w)
    counts = torch.tensor([len(t["boxes"]) for t in labels], device=pixel_mask.device)
    boxes = torch.cat([t["boxes"] for t in labels])[(counts.cumsum(0) - counts)[last.image] + last.gt]
    coverage = gt_coverage(boxes, image_sizes[last.image], tuple(pixel_mask.shape[-2:]), grid)
    maps = [attention.mean(1)[p.image, p.query].view(-1, *grid) * token_mask[p.image]
            for attention, p in zip(cross_attentions, pairs)]
    concentration = torch.stack([concentration_loss(m, coverage) for m in maps]).mean()
    if len(maps) == 1:
        return concentration, zero
    stability = torch.stack([stability_loss(m, maps[-1]) for m in maps[:-1]]).mean()
    return concentration, stability


def joint_loss(model: PreTrainedModel, pixel_values: torch.Tensor, pixel_mask: torch.Tensor,
               labels: list[dict[str, torch.Tensor]], lambda_in: float, lambda_stab: float) -> JointLoss:
    """One forward with transformers' set loss and the AAJTS terms on the pairs that loss matched; the
    cross-attention comes from `output_attentions=True` (eager attention), inside the autograd graph."""
    require_dense_attention(model)
    with capture_matches() as calls, capture_outputs({"projection": model.model.input_projection}) as captured:
        out = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels, output_attentions=True)
    grid = tuple(captured["projection"].shape[-2:])  # type: ignore[union-attr]
    matches = layer_matches(calls, len(out.cross_attentions))
    pairs = [Pairs.from_match(match, pixel_values.device) for match in matches]
    concentration, stability = attention_losses(out.cross_attentions, pairs, labels, pixel_mask, grid)
    total = out.loss + lambda_in * concentration + lambda_stab * stability
    return JointLoss(total, out.loss, concentration, stability)
