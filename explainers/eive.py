"""EIVE: instance saliency from the decoder's cross-attention, for every instance of a batch at once.

In a DETR-like detector each prediction comes from one object query, and that query's cross-attention
over the image tokens is where it looked. One forward explains every detection: no gradients, no
perturbation. Layers are fused by CLHCF (METHODS.md 1c, reconstructed) or a simpler rule.

Everything stays on the model's device and is vectorised over instances and layers: the rows of the
kept queries are gathered first, so no [L, B, M, Q, N] tensor ever leaves the device. For a multi-scale
deformable model (Deformable DETR, RT-DETR) the rows are the splat of the queries' sampling points merged
onto the finest level (METHODS.md 1b, `explainers.splat`); the fusion is the same.
"""

from __future__ import annotations

from typing import ClassVar, get_args

import torch
from torchvision.ops import box_convert

from eive_audit.explainers._common import attention_rows
from eive_audit.explainers.base import register
from eive_audit.pipeline.config import EiveSettings
from eive_audit.pipeline.models.detr import DetectorOutput, DetrAdapter
from eive_audit.pipeline.models.boxes import paired_box_iou
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets

FUSIONS: tuple[str, ...] = get_args(EiveSettings.model_fields["fusion"].annotation)
DEFAULT_FUSION: str = EiveSettings.model_fields["fusion"].default


def _minmax(x: torch.Tensor, valid: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each row to [0, 1] over its valid tokens; invalid (padding) tokens become 0."""
    lo = x.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    hi = x.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    return ((x - lo) / (hi - lo).clamp(min=eps)).clamp(min=0) * valid


@register("eive")
class EIVE:
    """Decoder cross-attention of each instance's query, fused over layers; the fusion, query tracking and
    CLHCF constants are `EiveSettings` (pipeline.config), validated there."""

    name: ClassVar[str]

    def __init__(self, settings: EiveSettings) -> None:
        self.settings = settings

    def explain(self, model: DetrAdapter, batch: PixelBatch, outputs: DetectorOutput, targets: Targets) -> torch.Tensor:
        h, w = outputs.grid
        if len(targets) == 0:
            return outputs.logits.new_zeros((0, h, w), dtype=torch.float32)
        rows, layer_scores = self._attention_rows(model, outputs, targets)  # [L, K, N], [L, K]
        valid = outputs.token_mask[targets.batch_index].flatten(1)  # [K, N]
        rows = rows * valid
        dist = rows / rows.sum(-1, keepdim=True).clamp(min=1e-12)
        fused = self._fuse(dist, layer_scores, valid)
        return (fused * valid).view(len(targets), h, w)

    def _attention_rows(self, model: DetrAdapter, outputs: DetectorOutput,
                        targets: Targets) -> tuple[torch.Tensor, torch.Tensor]:
        """Head-averaged attention row of each instance's representative query per layer, and that
        query's score p_l(r, c) * IoU(box_l(r), box)."""
        n_layers = outputs.layer_logits.shape[0]
        b = targets.batch_index
        probs = model.class_probs(outputs.layer_logits[:, b])  # [L, K, Q, C]
        label = targets.label[None, :, None, None].expand(*probs.shape[:3], 1)
        class_prob = probs.gather(-1, label)[..., 0]  # [L, K, Q]
        layer_boxes = box_convert(outputs.layer_boxes[:, b].float(), "cxcywh", "xyxy")  # [L, K, Q, 4]
        target_box = box_convert(targets.box.float(), "cxcywh", "xyxy")[None, :, None, :]
        score = paired_box_iou(layer_boxes, target_box) * class_prob  # [L, K, Q]
        if self.settings.track:
            best, query = score.max(-1)
        else:
            query = targets.query.expand(n_layers, -1)
            best = score.gather(-1, query[..., None])[..., 0]
        return attention_rows(outputs, torch.arange(n_layers, device=query.device), b, query), best

    def _fuse(self, dist: torch.Tensor, layer_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Fuse per-layer distributions [L, K, N] into one map per instance [K, N]."""
        settings = self.settings
        if settings.fusion == "last":
            return dist[-1]
        if settings.fusion == "mean":
            return dist.mean(0)
        if settings.fusion == "max":
            return dist.amax(0)
        log_dist = torch.log(dist + settings.eps)
        if settings.fusion == "product":
            return log_dist.mean(0).exp()
        weights = torch.softmax(layer_scores / settings.temperature, dim=0)[..., None]  # [L, K, 1]
        union = (weights * dist).sum(0)
        consensus = (weights * log_dist).sum(0).exp()
        threshold = torch.nanquantile(dist.masked_fill(~valid, float("nan")), 1 - settings.rho, dim=-1, keepdim=True)
        vote = (dist >= threshold).float().mean(0)
        alpha, eps = settings.alpha, settings.eps
        return alpha * _minmax(consensus, valid, eps) + (1 - alpha) * _minmax(union * vote, valid, eps)
