"""Match one image's predictions to its GT boxes as COCO's evaluation does, and name each outcome.

The rule is pycocotools' (`COCOeval.evaluateImg` at one IoU threshold, area range 'all'), overlaps
included (`pycocotools.mask.iou`), so an audited `tp`, `fp` or `fn` is what COCO AP counts as one. (COCOeval
also scores only the 100 best detections per image and class: the default `--max-detections` keeps 100 per image.)
A prediction is a `tp` (it took a GT box), `crowd` (a crowd region absorbed it: COCO ignores it, neither
tp nor fp), `dup` (it overlaps only GT that better-scored predictions took) or `fp`. A regular GT box
left untaken is a `fn`; a crowd region never is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_convert

TP, FP, DUP, FN, CROWD = "tp", "fp", "dup", "fn", "crowd"
DET = "det"  # a detection in an image source without annotations: nothing to match against


@dataclass(frozen=True)
class Match:
    """outcome[P] per prediction; gt_index[P] (the GT taken for tp, the absorbing region for crowd, the
    overlapped GT for dup, -1 for fp); iou[P] with that GT (for crowd: the share of the prediction inside the
    region; 0 for fp); missed[G'] the indices of regular GT boxes no prediction took."""

    outcome: list[str]
    gt_index: torch.Tensor
    iou: torch.Tensor
    missed: torch.Tensor


def _coco_overlaps(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_crowd: torch.Tensor) -> torch.Tensor:
    """[P, G] overlaps as COCO measures them: IoU with a regular GT box; with a crowd region, the
    intersection over the prediction's own area (a region holds many objects, so a prediction on one of
    them must not be judged against the whole region)."""
    def xywh(boxes: torch.Tensor) -> np.ndarray:
        return box_convert(boxes.double(), "xyxy", "xywh").numpy()

    overlaps = mask_utils.iou(xywh(pred_boxes), xywh(gt_boxes), gt_crowd.numpy().astype(np.uint8))
    return torch.from_numpy(np.asarray(overlaps))


def _last_best(overlaps: torch.Tensor, allowed: torch.Tensor, threshold: float) -> int:
    """The allowed GT with the largest overlap >= threshold, the last one on a tie; -1 if none reaches it."""
    values = overlaps.masked_fill(~allowed, -1.0)
    top = values.max()
    return int((values == top).nonzero().max()) if top >= threshold else -1


def match_image(pred_boxes: torch.Tensor, pred_scores: torch.Tensor, pred_labels: torch.Tensor,
                gt_boxes: torch.Tensor, gt_labels: torch.Tensor, gt_crowd: torch.Tensor | None = None,
                iou_threshold: float = 0.5) -> Match:
    """Match predictions [P] (xyxy, score, category id) to GT [G] (xyxy, category id, crowd flag; no flags:
    no crowd regions) the way COCOeval.evaluateImg does.

    Predictions go best score first (equal scores keep their order), and each looks only at GT of its
    class. It takes the regular GT box not yet taken that it overlaps most, if that IoU reaches the
    threshold; of equal overlaps the later GT wins (COCOeval walks the GT in order and moves to any one
    whose overlap is not below the best so far). Crowd regions come after all regular GT: COCOeval stops
    once it holds a regular match, so a region is tried only when no regular GT is left to take, with the
    same tie rule, and it stays available to every later prediction. A prediction that neither takes a GT
    box nor falls in a region is a `dup` if it overlaps a taken one that much (an fp to COCO), else an `fp`.
    """
    n_pred, n_gt = len(pred_boxes), len(gt_boxes)
    crowd = torch.zeros(n_gt, dtype=torch.bool) if gt_crowd is None else torch.as_tensor(gt_crowd, dtype=torch.bool)
    outcome = [FP] * n_pred
    gt_index = torch.full((n_pred,), -1, dtype=torch.long)
    best = torch.zeros(n_pred, dtype=torch.float64)
    taken = torch.zeros(n_gt, dtype=torch.bool)
    if n_pred and n_gt:
        overlaps = _coco_overlaps(pred_boxes, gt_boxes, crowd)
        same_class = pred_labels[:, None] == gt_labels[None, :]
        for p in torch.argsort(pred_scores, descending=True, stable=True).tolist():
            for kind, allowed in ((TP, ~crowd & ~taken), (CROWD, crowd), (DUP, taken)):
                g = _last_best(overlaps[p], allowed & same_class[p], iou_threshold)
                if g >= 0:
                    outcome[p], gt_index[p], best[p] = kind, g, overlaps[p, g]
                    break
            if outcome[p] == TP:
                taken[gt_index[p]] = True
    return Match(outcome, gt_index, best, (~taken & ~crowd).nonzero().flatten())
