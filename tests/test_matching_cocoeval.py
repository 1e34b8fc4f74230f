"""The audit's outcomes on real COCO (coco_tiny val, 11 crowd regions) are pycocotools' COCOeval verdicts."""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from coco_reference import cocoeval_verdict
from pycocotools.coco import COCO
from torchvision.ops import box_convert

from eive_audit.pipeline.audit import _image_instances
from eive_audit.pipeline.batching import ImageBatch, iter_batches
from eive_audit.pipeline.matching import CROWD, DUP, FN, FP, TP
from eive_audit.pipeline.models.detr import DetrAdapter, Detections
from eive_audit.pipeline.models.families import write_random_model
from eive_audit.pipeline.models.labels import label_to_category
from eive_audit.pipeline.sources import CocoSource, ImageRecord


def _with_gt_copies(dets: Detections, record: ImageRecord, category_label: dict[int, int],
                    rng: np.random.Generator) -> Detections:
    """The model's detections plus two jittered copies of every GT box (crowd regions too), of its class and
    a random score: a random-init model alone hardly ever lands on an object, and these give tps, dups
    (the second copy), near misses at the 0.5 boundary and detections on crowd regions. Their query
    numbers follow the model's, so every detection keeps its own instance id."""
    copies = torch.as_tensor(record.boxes).double().repeat_interleave(2, 0)
    centre, size = np.split(box_convert(copies, "xyxy", "cxcywh").numpy(), 2, 1)
    centre = centre + rng.normal(0.0, 0.2, centre.shape) * size
    size = size * np.exp(rng.normal(0.0, 0.25, size.shape))
    boxes = box_convert(torch.from_numpy(np.concatenate([centre, size], 1)), "cxcywh", "xyxy")
    first = int(dets.queries.max()) + 1 if len(dets.queries) else 0
    return Detections(
        boxes=torch.cat([dets.boxes, boxes.float()]),
        scores=torch.cat([dets.scores, torch.tensor(rng.uniform(0, 1, len(boxes)), dtype=torch.float32)]),
        labels=torch.cat([dets.labels, torch.tensor([category_label[int(c)] for c in record.labels],
                                                    dtype=torch.long).repeat_interleave(2)]),
        queries=torch.cat([dets.queries, torch.arange(first, first + len(boxes))]),
    )


def test_audit_outcomes_on_coco_tiny_are_cocoevals(coco_tiny: Path, tmp_path: Path) -> None:
    annotations = coco_tiny / "annotations" / "instances_val2017.json"
    source = CocoSource(annotations, coco_tiny / "val2017")
    model = write_random_model("conditional-detr-small", [source.categories[c] for c in sorted(source.categories)],
                               tmp_path / "model")
    adapter = DetrAdapter.load(model, "cpu")
    label_map, _ = label_to_category(adapter.label_names, source.categories)
    category_label = {c: l for l, c in label_map.items()}
    rng = np.random.default_rng(0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
    crowd_ids = {ann["id"] for ann in gt.dataset["annotations"] if ann["iscrowd"]}

    results, ours, missed = [], [], set()
    for item in iter_batches(source, 16, adapter.preprocess_config.longest_edge):
        assert isinstance(item, ImageBatch)  # coco_tiny val has no bad image or box
        with torch.inference_mode():
            batch = adapter.preprocess(item.images, item.sizes)
            output = adapter.forward(batch)
            detections = adapter.postprocess(output, batch, score_threshold=0.0, max_detections=100)
        for i, (record, dets) in enumerate(zip(item.records, detections)):
            dets = _with_gt_copies(dets, record, category_label, rng)
            instances = {inst.instance_id: inst for inst in
                         _image_instances(i, record, output, batch, adapter, dets, label_map, annotated=True)}
            for query, box, score, label in zip(dets.queries.tolist(), box_convert(dets.boxes.double(), "xyxy", "xywh"),
                                                dets.scores.tolist(), dets.labels.tolist()):
                results.append({"image_id": record.image_id, "category_id": label_map[label], "bbox": box.tolist(),
                                "score": score})
                inst = instances[f"{record.image_id}-q{query}"]
                ours.append((inst.outcome, record.annotation_ids[inst.gt] if inst.outcome in (TP, CROWD) else 0))
            missed |= {record.annotation_ids[inst.gt] for inst in instances.values() if inst.outcome == FN}
    verdict, coco_missed = cocoeval_verdict(gt, results)

    assert [(FP if kind == DUP else kind, g) for kind, g in ours] == verdict  # COCO counts a dup as an fp
    assert missed == coco_missed
    assert len(crowd_ids) == 11 and not missed & crowd_ids
    kinds = Counter(kind for kind, _ in ours)
    assert all(kinds[k] > 0 for k in (TP, DUP, CROWD, FP)) and missed, (kinds, len(missed))  # every case is met
