"""How much a model leans on the planted cue: recall of the cued class with and without its cue.

Renders a fresh synthetic val split, detects on every image that has a cued object, then on the same
image re-rendered without its cues (the generator's counterfactual). Prints JSON:
  {"cued_recall_with_cue", "cued_recall_without_cue", "recall_drop", "other_recall", ...}

    python benchmarks/cue_reliance.py --model default --n-val 300 --seed 1234
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from eive_audit.pipeline.evaluation import class_recall
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.sources import CocoSource, ImageRecord
from eive_audit.pipeline.sources.decode import decode_rgb
from eive_audit.pipeline.sources.synthetic import CUED_CATEGORY, generate, render_counterfactual


def measure(model: str, n_val: int, seed: int, batch_size: int = 32) -> dict[str, float | int]:
    adapter = DetrAdapter.load(model)
    cued_label = next(i for i, name in adapter.label_names.items() if name == CUED_CATEGORY)
    with tempfile.TemporaryDirectory() as tmp:
        ann = generate(Path(tmp), 0, n_val, seed)["val"]
        source = CocoSource(ann, Path(tmp) / "images" / "val")
        raw = json.loads(ann.read_text())
        cued_anns = {c["annotation_id"] for c in raw["cues"] if c["annotation_id"] is not None}
        records = [r for r in source if isinstance(r, ImageRecord) and cued_anns & set(r.annotation_ids)]
        totals = np.zeros((3, 2), dtype=int)  # rows: cued with cue, cued without cue, other classes; cols: found, total
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            originals = [decode_rgb(r.path, adapter.preprocess_config.longest_edge) for r in chunk]
            counterfactuals = [torch.from_numpy(np.asarray(render_counterfactual(ann, r.image_id))).permute(2, 0, 1)
                               for r in chunk]
            with_cue = adapter.detect(originals, score_threshold=0.0, sizes=[(r.height, r.width) for r in chunk])
            without_cue = adapter.detect(counterfactuals, score_threshold=0.0)
            for record, det_with, det_without in zip(chunk, with_cue, without_cue):
                is_cued = np.array([a in cued_anns for a in record.annotation_ids])
                totals[0] += class_recall(det_with, record.boxes, is_cued, cued_label)
                totals[1] += class_recall(det_without, record.boxes, is_cued, cued_label)
                for label, name in adapter.label_names.items():
                    if name != CUED_CATEGORY:
                        totals[2] += class_recall(det_with, record.boxes, np.array(record.names) == name, label)
    recall = totals[:, 0] / np.maximum(totals[:, 1], 1)
    return {"model": model, "seed": seed, "images_with_cued_objects": len(records), "cued_objects": int(totals[0, 1]),
            "cued_recall_with_cue": round(float(recall[0]), 4), "cued_recall_without_cue": round(float(recall[1]), 4),
            "recall_drop": round(float(recall[0] - recall[1]), 4), "other_recall_same_images": round(float(recall[2]), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--n-val", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.n_val, args.seed)))


if __name__ == "__main__":
    main()
