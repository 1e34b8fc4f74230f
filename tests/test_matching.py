"""COCO-style greedy matching, on hand-built cases."""

from __future__ import annotations

import torch

from eive_audit.pipeline.matching import DUP, FP, TP, match_image


def test_greedy_by_score_with_duplicates_misses_and_class_check() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]])
    gt_labels = torch.tensor([1, 1, 2])
    preds = torch.tensor([
        [0.0, 0.0, 10.0, 9.0],     # 0: good overlap with GT 0, lower score
        [0.0, 0.0, 10.0, 10.0],    # 1: exact GT 0, best score -> tp
        [20.0, 20.0, 30.0, 30.0],  # 2: GT 1 but wrong class -> fp
        [60.0, 60.0, 70.0, 70.0],  # 3: background -> fp
    ])
    scores = torch.tensor([0.8, 0.9, 0.7, 0.6])
    labels = torch.tensor([1, 1, 2, 1])
    m = match_image(preds, scores, labels, gt, gt_labels)
    assert m.outcome == [DUP, TP, FP, FP]
    assert m.gt_index.tolist() == [0, 0, -1, -1]
    assert abs(float(m.iou[0]) - 0.9) < 1e-6
    assert m.missed.tolist() == [1, 2]


def test_a_lower_score_can_take_the_next_free_gt() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]])
    preds = torch.tensor([[1.0, 0.0, 11.0, 10.0], [1.0, 0.0, 11.0, 10.0]])
    m = match_image(preds, torch.tensor([0.9, 0.8]), torch.tensor([3, 3]), gt, torch.tensor([3, 3]))
    assert m.outcome == [TP, TP] and sorted(m.gt_index.tolist()) == [0, 1] and len(m.missed) == 0


def test_empty_sides() -> None:
    none = torch.zeros(0, 4)
    m = match_image(none, torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([1]))
    assert m.outcome == [] and m.missed.tolist() == [0]
    m = match_image(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0.5]), torch.tensor([1]), none, torch.zeros(0, dtype=torch.long))
    assert m.outcome == [FP] and len(m.missed) == 0
