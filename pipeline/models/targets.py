"""What an explainer is asked to explain: K instances of a batch, as tensors on the model's device, and how well
a forward still finds them (`instance_scores`, the score of every perturbation: faithfulness, verification, AHA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_convert

from eive_audit.pipeline.models.boxes import paired_box_iou


@dataclass(frozen=True)
class Targets:
    """K instances to explain, as tensors on the model's device.

    batch_index [K] (image in the batch), query [K] (the query that predicted it, or the best-overlapping
    query of a missed GT box), label [K] (model label index), box [K, 4] (normalised cxcywh, the
    instance's box in the model's frame: the prediction's, or the missed GT box).
    """

    batch_index: torch.Tensor
    query: torch.Tensor
    label: torch.Tensor
    box: torch.Tensor

    def __len__(self) -> int:
        return int(self.query.shape[0])


def instance_scores(probs: torch.Tensor, boxes: torch.Tensor, label: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Best IoU(query box, box) * p(query, label) over queries: probs [N, Q, C], boxes [N, Q, 4] and box [N, 4]
    normalised cxcywh, label [N] -> [N]."""
    iou = paired_box_iou(box_convert(boxes.float(), "cxcywh", "xyxy"), box_convert(box.float(), "cxcywh", "xyxy")[:, None])
    p = probs.float().gather(-1, label[:, None, None].expand(-1, probs.shape[1], 1))[..., 0]
    return (iou * p).amax(-1)
