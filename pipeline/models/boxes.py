"""Box ops that torchvision.ops lacks: IoU of boxes paired by position."""

from __future__ import annotations

import torch


def paired_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes paired by position (not all pairs, unlike torchvision's box_iou).

    a, b: [..., 4] xyxy with broadcastable leading shapes; returns [...]. Empty boxes give 0.
    """
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-12)
