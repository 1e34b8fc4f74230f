"""COCO detection metrics of a model on a COCO-format dataset (pycocotools COCOeval), and class recall."""

from __future__ import annotations

import contextlib
import io
from typing import Callable

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert, box_iou

from eive_audit.pipeline.batching import ImageBatch, iter_batches
from eive_audit.pipeline.models.detr import DetrAdapter, Detections
from eive_audit.pipeline.models.labels import label_to_category
from eive_audit.pipeline.sources.coco import CocoSource


def predict(
    adapter: DetrAdapter, source: CocoSource, batch_size: int = 16, score_threshold: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[int, Detections], int]:
    """Detections of every readable image (keyed by image id) and the number of images that failed."""
    results: dict[int, Detections] = {}
    failed_images = 0
    for item in iter_batches(source, batch_size, adapter.preprocess_config.longest_edge):
        if not isinstance(item, ImageBatch):
            failed_images += item.annotation_id is None  # a bad box alone does not fail its image
            continue
        for record, dets in zip(item.records, adapter.detect(item.images, score_threshold, 100, item.sizes)):
            results[record.image_id] = dets
        if progress is not None:
            progress(len(item.records))
    return results, failed_images


def coco_metrics(adapter: DetrAdapter, source: CocoSource, batch_size: int = 16,
                 progress: Callable[[int], None] | None = None) -> dict[str, float | int | str]:
    """AP, AP50, AP75 (COCOeval, bbox) over every query's best class, as COCO evaluates detectors."""
    mapping, how = label_to_category(adapter.label_names, source.categories)
    detections, errors = predict(adapter, source, batch_size, 0.0, progress)
    rows = []
    for image_id, dets in detections.items():
        xywh = box_convert(dets.boxes, "xyxy", "xywh").tolist()
        for box, score, label in zip(xywh, dets.scores.tolist(), dets.labels.tolist()):
            if label in mapping:
                rows.append({"image_id": image_id, "category_id": mapping[label], "bbox": box, "score": score})
    summary: dict[str, float | int | str] = {"images": len(detections), "errors": errors, "label_mapping": how}
    if not rows:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, **summary}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables to stdout
        evaluator = COCOeval(source.coco, source.coco.loadRes(rows), "bbox")
        evaluator.params.imgIds = sorted(detections)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"AP": round(float(stats[0]), 4), "AP50": round(float(stats[1]), 4), "AP75": round(float(stats[2]), 4), **summary}


def class_recall(detections: Detections, gt_boxes: np.ndarray, gt_is_class: np.ndarray, label: int,
                 score_threshold: float = 0.5, iou_threshold: float = 0.5) -> tuple[int, int]:
    """(found, total) GT boxes of one class hit by a same-class detection scoring >= threshold."""
    gt = torch.as_tensor(gt_boxes[gt_is_class], dtype=torch.float32).reshape(-1, 4)
    keep = (detections.labels == label) & (detections.scores >= score_threshold)
    if len(gt) == 0 or not keep.any():
        return 0, len(gt)
    hit = box_iou(gt, detections.boxes[keep].float()).max(dim=1).values >= iou_threshold
    return int(hit.sum()), len(gt)
