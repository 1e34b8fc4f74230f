"""pycocotools' own verdict on detections, read from COCOeval's per-image results, to test our matching against."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def cocoeval_verdict(gt: COCO, results: list[dict[str, Any]]) -> tuple[list[tuple[str, int]], set[int]]:
    """COCOeval (bbox) at IoU 0.5, area 'all', 100 detections per image and class, on `results` (loadRes
    rows: image_id, category_id, bbox xywh, score). Returns each result's verdict, in the order given:
    ("tp", gt id), ("crowd", crowd gt id) for one COCO ignores (dtIgnore), ("fp", 0) otherwise; and the ids of
    the regular GT no detection matched (crowd GT is gtIgnore, never missed)."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        evaluator = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
        evaluator.params.imgIds = sorted(gt.getImgIds())
        evaluator.evaluate()
    params = evaluator.params
    assert params.iouThrs[0] == 0.5 and params.maxDets[-1] == 100
    verdict: list[tuple[str, int]] = [("", 0)] * len(results)
    missed: set[int] = set()
    for entry in evaluator.evalImgs:
        if entry is None or entry["aRng"] != params.areaRng[params.areaRngLbl.index("all")]:
            continue
        for d, dt_id in enumerate(entry["dtIds"]):  # loadRes numbers results from 1 in the order given
            gt_id = int(entry["dtMatches"][0, d])
            verdict[dt_id - 1] = ("crowd", gt_id) if entry["dtIgnore"][0, d] else ("tp", gt_id) if gt_id else ("fp", 0)
        missed |= {int(g) for g, hit, ignored in zip(entry["gtIds"], entry["gtMatches"][0], entry["gtIgnore"])
                   if not hit and not ignored}
    assert all(kind for kind, _ in verdict), "COCOeval left a detection out (over 100 in one image and class?)"
    return verdict, missed
