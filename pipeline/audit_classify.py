"""The audit of one batch of a ViT classifier: forward, the instances of each image, explain, score, emit rows.

A classifier is audited as a detector with one query whose box is the whole image, so the detection audit's
scoring (`pipeline.audit.explain_and_score`), faithfulness (score = p(class), the box's IoU being 1) and the
findings' re-scoring apply unchanged. An image's instances are its predicted class, outcome `correct` or
`wrong`, and, when the prediction is wrong, the true class (`missed`: where the model looked for the class it
should have said). Without a true class (an unlabelled image) the prediction is a `det`. The GT box an instance
is scored against is the largest object box of the image's class, where the index gives boxes; the others count
as other objects (`mass_on_other_gt`); without boxes the localisation scores stay null.
"""

from __future__ import annotations

import time

import torch

from eive_audit.pipeline.audit import BatchExplainer, BatchRows, Instance, explain_and_score
from eive_audit.pipeline.batching import ImageBatch
from eive_audit.pipeline.config import FindingsConfig
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.models.vit import ViTAdapter
from eive_audit.pipeline.sources.records import ImageRecord

CORRECT, WRONG, MISSED, UNLABELLED = "correct", "wrong", "missed", "det"
WHOLE_IMAGE = (0.5, 0.5, 1.0, 1.0)  # normalised cxcywh: the box of every classification instance


def _largest_box(record: ImageRecord) -> int:
    """Index of the image's largest object box, -1 without boxes."""
    if len(record.boxes) == 0:
        return -1
    boxes = torch.as_tensor(record.boxes)
    return int(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argmax())


def image_instances(i: int, record: ImageRecord, probs: torch.Tensor, adapter: ViTAdapter,
                    label_map: dict[int, int]) -> list[Instance]:
    """One image's instances from its class probabilities [C]: the prediction, and the true class when the
    prediction is wrong (only if the model has that class)."""
    cat_to_label = {c: l for l, c in label_map.items()}
    whole = torch.tensor([0.0, 0.0, float(record.width), float(record.height)])
    gt = _largest_box(record)

    def instance(label: int, outcome: str) -> Instance:
        category = label_map.get(label)
        return Instance(i, f"{record.image_id}-c{label}", outcome, 0, label, category, adapter.label_names[label],
                        float(probs[label]), whole, gt, None)

    predicted = int(probs.argmax())
    if record.class_label is None:
        return [instance(predicted, UNLABELLED)]
    if label_map.get(predicted) == record.class_label:
        return [instance(predicted, CORRECT)]
    true = cat_to_label.get(record.class_label)
    return [instance(predicted, WRONG)] + ([instance(true, MISSED)] if true is not None else [])


def classify_batch(adapter: ViTAdapter, explainers: list[BatchExplainer], item: ImageBatch, label_map: dict[int, int],
                   *, findings: FindingsConfig) -> BatchRows:
    """Rows of the images, instances and maps tables for one decoded batch of a classifier (maps as float32
    arrays); `label_map`: model label -> dataset class id."""
    started = time.perf_counter()
    with torch.inference_mode():
        batch = adapter.preprocess(item.images, item.sizes)
        output = adapter.forward(batch)
        probs = adapter.class_probs(output.logits).float().cpu()
    forward_s = time.perf_counter() - started
    instances = [inst for i, record in enumerate(item.records)
                 for inst in image_instances(i, record, probs[i], adapter, label_map)]
    device = adapter.device
    targets = Targets(batch_index=torch.tensor([inst.image for inst in instances], dtype=torch.long, device=device),
                      query=torch.zeros(len(instances), dtype=torch.long, device=device),
                      label=torch.tensor([inst.model_label for inst in instances], dtype=torch.long, device=device),
                      box=torch.tensor([WHOLE_IMAGE] * len(instances), device=device).reshape(-1, 4))
    return explain_and_score(adapter, explainers, item, batch, output, instances, targets, "classify", findings,
                             forward_s, [1] * len(item.records))
