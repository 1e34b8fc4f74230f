"""Match one image's predictions to its GT boxes the way COCO does, and name each outcome.

Greedy by score: each prediction takes the unmatched same-class GT box it overlaps most (IoU >= 0.5)
and is a `tp`; one that only overlaps already-taken GT of its class is a `dup`; anything else is an
`fp`. GT left unmatched is a `fn`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

TP, FP, DUP, FN = "tp", "fp", "dup", "fn"
DET = "det"  # a detection in an image source without annotations: nothing to match against


@dataclass(frozen=True)
class Match:
    """outcome[P] per prediction; gt_index[P] (matched GT for tp, the overlapped GT for dup, -1 for fp);
    iou[P] with that GT (0 for fp); missed[G'] the indices of GT boxes no prediction matched."""

    outcome: list[str]
    gt_index: torch.Tensor
    iou: torch.Tensor
    missed: torch.Tensor


def match_image(pred_boxes: torch.Tensor, pred_scores: torch.Tensor, pred_labels: torch.Tensor,
                gt_boxes: torch.Tensor, gt_labels: torch.Tensor, iou_threshold: float = 0.5) -> Match:
    """Match predictions [P] (xyxy, score, category id) to GT [G] (xyxy, category id)."""
    n_pred, n_gt = len(pred_boxes), len(gt_boxes)
    outcome = [FP] * n_pred
    gt_index = torch.full((n_pred,), -1, dtype=torch.long)
    best_iou = torch.zeros(n_pred)
    taken = torch.zeros(n_gt, dtype=torch.bool)
    if n_pred and n_gt:
        iou = box_iou(pred_boxes.float(), gt_boxes.float())
        iou = iou * (pred_labels[:, None] == gt_labels[None, :])  # only same-class pairs can match
        for p in torch.argsort(pred_scores, descending=True, stable=True).tolist():
            free = iou[p].masked_fill(taken, -1.0)
            g = int(free.argmax())
            if free[g] >= iou_threshold:
                outcome[p], gt_index[p], best_iou[p] = TP, g, float(free[g])
                taken[g] = True
                continue
            g = int(iou[p].argmax())
            if iou[p, g] >= iou_threshold:  # it overlaps GT that a better-scored prediction already took
                outcome[p], gt_index[p], best_iou[p] = DUP, g, float(iou[p, g])
    return Match(outcome, gt_index, best_iou, (~taken).nonzero().flatten())
