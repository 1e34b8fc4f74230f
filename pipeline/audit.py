"""The audit of one batch: forward, postprocess, match, explain every instance, score, emit table rows.

Explained instances are the kept detections (tp / fp / dup, or crowd where a COCO crowd region absorbed
one, which COCO counts as neither tp nor fp) and every missed GT box (fn; never a crowd region), the latter
through the query whose final box overlaps it most: "why was it missed". All instances of a batch go
to each explainer in one call. Each row carries its localisation scores and the off-object flags
(`pipeline.findings.flags`), so every later step reads the same flags. Rows are plain dicts in the column
names of `storage.schema`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

from eive_audit.pipeline.batching import ImageBatch
from eive_audit.pipeline.config import FindingsConfig
from eive_audit.pipeline.findings.flags import OBJECT_OUTCOMES, flag_map, object_cells
from eive_audit.pipeline.geometry import Geometry
from eive_audit.pipeline.matching import DET, FN, match_image
from eive_audit.pipeline.metrics.faithfulness import FaithfulnessConfig, FaithfulnessResult, deletion_insertion
from eive_audit.pipeline.metrics.localization import localization_scores
from eive_audit.pipeline.models.detr import DetectorOutput, DetrAdapter
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.sources.records import ImageRecord


class BatchExplainer(Protocol):
    """What the audit needs of an explainer (see explainers.base)."""

    name: str

    def explain(self, model: DetrAdapter, batch: PixelBatch, outputs: DetectorOutput, targets: Targets) -> torch.Tensor:
        ...


@dataclass
class Instance:
    """One instance to explain, before scoring: where it came from and what it is matched to."""

    image: int  # index in the batch
    instance_id: str
    outcome: str
    query: int
    model_label: int
    category: int | None
    label_name: str
    score: float
    pred_box: torch.Tensor  # xyxy, original pixels
    gt: int  # index into the record's GT boxes, -1 for none
    iou: float | None


@dataclass(frozen=True)
class ImageBoxes:
    """One image's instances and the boxes they are scored against, in grid units: explainer-independent."""

    record: ImageRecord
    geometry: Geometry
    index: list[int]  # the image's instances: positions in the batch's instance list
    own: torch.Tensor  # [K, 4] each instance's predicted box (the explained query's)
    gt_index: torch.Tensor  # [K] each instance's GT box in `gts`, -1 for none
    gts: torch.Tensor  # [G, 4] every GT box of the image
    objects: torch.Tensor  # [K, h, w] the cells of each instance's object (`findings.flags.object_cells`)

    @classmethod
    def of_image(cls, record: ImageRecord, geometry: Geometry, instances: list[Instance],
                 index: list[int]) -> "ImageBoxes":
        """The boxes of the instances at `index` (all of one image). A false positive's object is every GT box
        the audit explains (of the classes the model has), as the findings step reads them from the rows."""
        own = geometry.to_grid(torch.stack([instances[k].pred_box for k in index]))
        gt_index = torch.tensor([instances[k].gt for k in index])
        gts = geometry.to_grid(torch.as_tensor(record.boxes).reshape(-1, 4))
        explained = gts[sorted({int(g) for g in gt_index if g >= 0})]
        objects = torch.stack([
            object_cells(instances[k].outcome, gts[g] if instances[k].outcome in OBJECT_OUTCOMES and g >= 0 else own[j],
                         explained, geometry.grid)
            for j, (k, g) in enumerate(zip(index, gt_index.tolist()))])
        return cls(record, geometry, index, own, gt_index, gts, objects)


@dataclass
class BatchRows:
    images: list[dict[str, Any]] = field(default_factory=list)
    instances: list[dict[str, Any]] = field(default_factory=list)
    maps: list[dict[str, Any]] = field(default_factory=list)


def _image_instances(i: int, record: ImageRecord, output: DetectorOutput, batch: PixelBatch, adapter: DetrAdapter,
                     detections: Any, label_map: dict[int, int], annotated: bool) -> list[Instance]:
    """Match one image's detections to its GT and list the instances to explain; in a source without
    annotations every detection is a `det`, not a false positive."""
    cat_to_label = {c: l for l, c in label_map.items()}
    categories = torch.tensor([label_map.get(int(l), -1) for l in detections.labels], dtype=torch.long)
    gt_boxes = torch.as_tensor(record.boxes)
    match = match_image(detections.boxes, detections.scores, categories, gt_boxes, torch.as_tensor(record.labels),
                        torch.as_tensor(record.crowd))
    outcomes = match.outcome if annotated else [DET] * len(match.outcome)
    instances = [
        Instance(i, f"{record.image_id}-q{int(q)}", outcome, int(q), int(l), int(c) if c >= 0 else None,
                 adapter.label_names[int(l)], float(s), box, int(g), float(iou) if g >= 0 else None)
        for q, l, c, s, box, outcome, g, iou in zip(detections.queries, detections.labels, categories,
                                                     detections.scores, detections.boxes, outcomes,
                                                     match.gt_index, match.iou)
    ]
    if len(match.missed):
        size = batch.original_sizes[i].flip(-1).repeat(2).float().cpu()  # (w, h, w, h)
        all_boxes = box_convert(output.boxes[i].float().cpu(), "cxcywh", "xyxy") * size
        overlap = box_iou(gt_boxes[match.missed], all_boxes)  # [missed, Q]
        probs = adapter.class_probs(output.logits[i]).cpu()
        for g, row in zip(match.missed.tolist(), overlap):
            category = int(record.labels[g])
            label = cat_to_label.get(category)
            if label is None:  # the model has no such class: nothing of it to explain
                continue
            q = int(row.argmax())
            ann = record.annotation_ids[g] if record.annotation_ids else g
            instances.append(Instance(i, f"{record.image_id}-gt{ann}", FN, q, label, category, record.names[g],
                                      float(probs[q, label]), all_boxes[q], g, float(row[q])))
    return instances


def _targets(instances: list[Instance], records: list[ImageRecord], device: torch.device) -> Targets:
    """Explainer targets: the instance box in the model's frame (GT box for a miss, else the prediction)."""
    boxes = []
    for inst in instances:
        record = records[inst.image]
        box = torch.as_tensor(record.boxes[inst.gt]) if inst.outcome == FN else inst.pred_box
        size = torch.tensor([record.width, record.height] * 2, dtype=torch.float32)
        boxes.append(box.float() / size)
    stacked = torch.stack(boxes) if boxes else torch.zeros(0, 4)
    return Targets(
        batch_index=torch.tensor([inst.image for inst in instances], dtype=torch.long, device=device),
        query=torch.tensor([inst.query for inst in instances], dtype=torch.long, device=device),
        label=torch.tensor([inst.model_label for inst in instances], dtype=torch.long, device=device),
        box=box_convert(stacked, "xyxy", "cxcywh").to(device),
    )


def _nan_to_none(value: float) -> float | None:
    return None if np.isnan(value) else value


def audit_batch(adapter: DetrAdapter, explainers: list[BatchExplainer], item: ImageBatch, label_map: dict[int, int],
                score_threshold: float, max_detections: int, annotated: bool = True, *,
                findings: FindingsConfig) -> BatchRows:
    """Rows of the images, instances and maps tables for one decoded batch (maps as float32 arrays);
    `annotated` is False for a source without GT (an image folder); `findings` sets the off-object flags."""
    started = time.perf_counter()
    with torch.inference_mode():
        batch = adapter.preprocess(item.images, item.sizes)
        output = adapter.forward(batch)
        detections = adapter.postprocess(output, batch, score_threshold, max_detections)
    forward_s = time.perf_counter() - started
    instances = [inst for i, record in enumerate(item.records)
                 for inst in _image_instances(i, record, output, batch, adapter, detections[i], label_map, annotated)]
    return explain_and_score(adapter, explainers, item, batch, output, instances, _targets(instances, item.records,
                             adapter.device), "detect", findings, forward_s, [len(d.scores) for d in detections])


def explain_and_score(adapter: Any, explainers: list[BatchExplainer], item: ImageBatch, batch: PixelBatch, output: Any,
                      instances: list[Instance], targets: Targets, task: str, findings: FindingsConfig,
                      forward_s: float, n_predictions: list[int]) -> BatchRows:
    """The rows of a batch whose instances are listed: every explainer's maps for all of them in one call, each
    map's localisation scores and off-object flags, and the images rows (`n_predictions` per image); shared by
    the detection audit and the classification audit (`pipeline.audit_classify`)."""
    padded = tuple(batch.pixel_values.shape[-2:])
    geometries = [Geometry((record.height, record.width), tuple(batch.input_sizes[i].tolist()), padded, output.grid)
                  for i, record in enumerate(item.records)]
    per_image = [ImageBoxes.of_image(record, geometry, instances, index)
                 for i, (record, geometry) in enumerate(zip(item.records, geometries))
                 if (index := [k for k, inst in enumerate(instances) if inst.image == i])]
    rows = BatchRows()
    explain_s = 0.0
    for explainer in explainers:
        started = time.perf_counter()
        maps = explainer.explain(adapter, batch, output, targets).float().cpu()
        explain_s += time.perf_counter() - started
        for image in per_image:
            scores = localization_scores(maps[image.index], image.own, image.gt_index, image.gts)
            for j, k in enumerate(image.index):
                inst = instances[k]
                # The flags read the map as stored (float16), as every later step does.
                flags = flag_map(inst.outcome, maps[k].half().float(), image.objects[j], findings)
                rows.instances.append(_instance_row(inst, image.record, explainer.name, task,
                                                    {n: float(v[j]) for n, v in scores.items()}) | flags.columns())
                rows.maps.append({"instance_id": inst.instance_id, "image_id": image.record.image_id,
                                  "explainer": explainer.name, "grid_h": output.grid[0], "grid_w": output.grid[1],
                                  "map": maps[k].numpy()})
    n = len(item.records)
    for i, (record, geometry) in enumerate(zip(item.records, geometries)):
        rows.images.append({
            "image_id": record.image_id, "file_path": str(record.path), **geometry.image_columns(),
            "exif_orientation": record.exif_orientation,
            "n_gt": len(record.labels), "n_detections": n_predictions[i],
            "status": "ok", "forward_ms": 1000 * forward_s / n, "explain_ms": 1000 * explain_s / n,
        })
    return rows


def _instance_row(inst: Instance, record: ImageRecord, explainer: str, task: str,
                  scores: dict[str, float]) -> dict[str, Any]:
    gt = record.boxes[inst.gt].tolist() if inst.gt >= 0 else [None] * 4
    x0, y0, x1, y1 = inst.pred_box.tolist()
    peak = _nan_to_none(scores["peak_in_gt"])
    return {
        "instance_id": inst.instance_id, "image_id": record.image_id, "explainer": explainer, "task": task,
        "outcome": inst.outcome, "query": inst.query, "label": inst.category,
        "label_name": inst.label_name, "score": inst.score,
        "pred_x0": x0, "pred_y0": y0, "pred_x1": x1, "pred_y1": y1,
        "gt_annotation_id": (record.annotation_ids[inst.gt] if inst.gt >= 0 and record.annotation_ids else None),
        "gt_x0": gt[0], "gt_y0": gt[1], "gt_x1": gt[2], "gt_y1": gt[3], "iou": inst.iou,
        "mass_in_pred": _nan_to_none(scores["mass_in_pred"]), "mass_in_gt": _nan_to_none(scores["mass_in_gt"]),
        "mass_on_other_gt": _nan_to_none(scores["mass_on_other_gt"]),
        "peak_in_gt": None if peak is None else bool(peak), "compactness": _nan_to_none(scores["compactness"]),
    }


def model_labels(adapter: DetrAdapter, rows: list[dict[str, Any]], label_map: dict[int, int]) -> list[int]:
    """The model's label index of stored instance rows: through the dataset category where the row has one
    (`label_map`: model label -> category), else by class name (an image folder has no categories)."""
    cat_to_label = {c: l for l, c in label_map.items()}
    label_of_name = {name: l for l, name in adapter.label_names.items()}
    return [cat_to_label[row["label"]] if row["label"] is not None else label_of_name[row["label_name"]] for row in rows]


def faithfulness_of_rows(adapter: DetrAdapter, item: ImageBatch, rows: list[dict[str, Any]], maps: list[np.ndarray],
                         label_map: dict[int, int], config: FaithfulnessConfig) -> FaithfulnessResult:
    """Deletion / insertion AUC of stored instances (rows of the instances table, with their maps) whose
    images are in `item`: the instance box is the prediction's, or the GT box for a miss, as when explained."""
    batch = adapter.preprocess(item.images, item.sizes)
    position = {record.image_id: i for i, record in enumerate(item.records)}
    labels = model_labels(adapter, rows, label_map)
    boxes = []
    for row in rows:
        record = item.records[position[row["image_id"]]]
        prefix = "gt" if row["outcome"] == FN else "pred"
        box = torch.tensor([row[f"{prefix}_{c}"] for c in ("x0", "y0", "x1", "y1")], dtype=torch.float32)
        boxes.append(box / torch.tensor([record.width, record.height] * 2, dtype=torch.float32))
    device = adapter.device
    targets = Targets(
        batch_index=torch.tensor([position[row["image_id"]] for row in rows], device=device),
        query=torch.tensor([row["query"] for row in rows], device=device),
        label=torch.tensor(labels, device=device),
        box=box_convert(torch.stack(boxes), "xyxy", "cxcywh").to(device),
    )
    stacked = torch.from_numpy(np.stack(maps)).float().to(device)
    return deletion_insertion(adapter.predict, batch.pixel_values, batch.pixel_mask, stacked, targets, config)
