"""COCO's matching, on hand-built cases and against pycocotools' COCOeval on random boxes with ties."""

from __future__ import annotations

import contextlib
import io

import torch
from coco_reference import cocoeval_verdict
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools.coco import COCO
from torchvision.ops import box_convert

from eive_audit.pipeline.matching import CROWD, DUP, FP, TP, match_image


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


def test_equal_overlaps_go_to_the_later_gt_as_in_cocoeval() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]])
    pred = torch.tensor([[1.0, 0.0, 11.0, 10.0]])  # IoU 9/11 with both
    m = match_image(pred, torch.tensor([0.9]), torch.tensor([3]), gt, torch.tensor([3, 3]))
    assert m.outcome == [TP] and m.gt_index.tolist() == [1] and m.missed.tolist() == [0]


def test_crowd_regions_absorb_predictions_and_are_never_missed() -> None:
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0],   # 0: a crowd region of class 1
                       [10.0, 10.0, 20.0, 20.0],   # 1: a person inside it
                       [60.0, 60.0, 70.0, 70.0]])  # 2: a crowd region nobody detects
    crowd = torch.tensor([True, False, True])
    preds = torch.tensor([
        [10.0, 10.0, 20.0, 20.0],  # 0: the person -> tp, though the region contains it wholly too
        [10.0, 10.0, 20.0, 20.0],  # 1: the same box again -> the region absorbs it, not a dup
        [40.0, 40.0, 50.0, 50.0],  # 2: another person of the region: IoU 0.01, but wholly inside -> crowd
        [90.0, 90.0, 110.0, 110.0],  # 3: a quarter inside -> fp
    ])
    m = match_image(preds, torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.ones(4, dtype=torch.long), gt,
                    torch.ones(3, dtype=torch.long), crowd)
    assert m.outcome == [TP, CROWD, CROWD, FP]
    assert m.gt_index.tolist() == [1, 0, 0, -1]
    assert float(m.iou[2]) == 1.0  # intersection over the prediction's area
    assert m.missed.tolist() == []


# Boxes on a coarse integer grid, so that equal overlaps (and equal scores) are common.
_boxes = st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(1, 4), st.integers(1, 4))  # xywh


@settings(max_examples=200, deadline=None)
@given(gts=st.lists(st.tuples(_boxes, st.sampled_from([1, 2]), st.booleans()), max_size=6),
       preds=st.lists(st.tuples(_boxes, st.sampled_from([1, 2]), st.sampled_from([0.3, 0.6, 0.9])),
                      min_size=1, max_size=8))
def test_match_image_gives_cocoevals_verdict(gts: list[tuple[tuple[int, ...], int, bool]],
                                             preds: list[tuple[tuple[int, ...], int, float]]) -> None:
    gt_coco = COCO()
    gt_coco.dataset = {"images": [{"id": 1, "width": 16, "height": 16}], "categories": [{"id": 1}, {"id": 2}],
                       "annotations": [{"id": g + 1, "image_id": 1, "category_id": label, "bbox": list(box),
                                        "area": box[2] * box[3], "iscrowd": int(crowd)}
                                       for g, (box, label, crowd) in enumerate(gts)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco.createIndex()
    results = [{"image_id": 1, "category_id": label, "bbox": list(box), "score": score} for box, label, score in preds]
    verdict, missed = cocoeval_verdict(gt_coco, results)

    def xyxy(boxes: list[tuple[int, ...]]) -> torch.Tensor:
        return box_convert(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")

    m = match_image(xyxy([b for b, _, _ in preds]), torch.tensor([s for _, _, s in preds]),
                    torch.tensor([label for _, label, _ in preds]), xyxy([b for b, _, _ in gts]),
                    torch.tensor([label for _, label, _ in gts], dtype=torch.long),
                    torch.tensor([c for _, _, c in gts], dtype=torch.bool))
    ours = [(outcome, int(g) + 1) if outcome in (TP, CROWD) else (FP, 0) for outcome, g in zip(m.outcome, m.gt_index)]
    assert ours == verdict
    assert {int(g) + 1 for g in m.missed} == missed
    for outcome, g, iou in zip(m.outcome, m.gt_index.tolist(), m.iou.tolist()):  # a dup overlaps GT a tp took
        assert outcome != DUP or (iou >= 0.5 and (TP, g + 1) in ours)
