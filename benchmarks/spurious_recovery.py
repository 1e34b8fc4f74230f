"""The planted-cue benchmark: does the audit rank the predictions that depend on the cue above the others?

Renders a fresh synthetic val split (with lone-cue images and cued-class objects drawn without their cue),
audits it with the model (the audit's findings step fills `spurious_score`), then builds the ground truth
the audit never sees: every instance of an image with a cue is re-scored on the generator's counterfactual
(the same image re-rendered without its cues, identical elsewhere); an instance is positive when its score
falls to half or less. Instances of images without cues are negatives (their counterfactual is the image).

All instances are ranked by our `spurious_score` and by baselines: random, 1 - confidence, and FiftyOne
Brain's mistakenness. Prints JSON:
  {"rankings": {"ours": {"auroc", "precision@10", "precision@25", "precision@100", "recall@100"}, ...},
   "n_instances", "n_positive", "top_cue": {...}, ...}

    python benchmarks/spurious_recovery.py --n-val 500 --seed 1234      # the full run of the README
    python benchmarks/spurious_recovery.py --quick                      # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torchvision.ops import box_convert

from eive_audit.pipeline.metrics.faithfulness import instance_scores
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.sources.decode import decode_rgb
from eive_audit.pipeline.sources.synthetic import CUED_CATEGORY, generate, render_counterfactual

KS = (10, 25, 100)


def counterfactual_ratios(adapter: DetrAdapter, rows: list[dict[str, Any]], ann: Path, images: Path,
                          batch_size: int = 16) -> dict[str, float]:
    """instance_id -> score on the counterfactual image / score on the original (1.0 without a cue), each
    scored as the faithfulness scores are: best IoU(query box, instance box) * p(instance class)."""
    raw = json.loads(ann.read_text())
    cued = {cue["image_id"] for cue in raw["cues"]}
    files = {image["id"]: image for image in raw["images"]}
    label_of = {name: label for label, name in adapter.label_names.items()}
    ratios = {row["instance_id"]: 1.0 for row in rows if row["image_id"] not in cued}
    todo = sorted({row["image_id"] for row in rows if row["image_id"] in cued})
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        originals = [decode_rgb(images / files[i]["file_name"], adapter.preprocess_config.longest_edge) for i in chunk]
        counterfactuals = [torch.from_numpy(np.array(render_counterfactual(ann, i))).permute(2, 0, 1) for i in chunk]
        batch = adapter.preprocess(originals + counterfactuals,
                                   [(files[i]["height"], files[i]["width"]) for i in chunk] * 2)
        with torch.inference_mode():
            probs, boxes = adapter.predict(batch.pixel_values, batch.pixel_mask)
        for b, image_id in enumerate(chunk):
            mine = [row for row in rows if row["image_id"] == image_id]
            size = torch.tensor([files[image_id]["width"], files[image_id]["height"]] * 2, dtype=torch.float32)
            box = torch.stack([torch.tensor([row[f"{'gt' if row['outcome'] == 'fn' else 'pred'}_{c}"]
                                             for c in ("x0", "y0", "x1", "y1")]) for row in mine]) / size
            box = box_convert(box, "xyxy", "cxcywh")
            label = torch.tensor([label_of[row["label_name"]] for row in mine])
            n = len(mine)
            before = instance_scores(probs[b].expand(n, -1, -1), boxes[b].expand(n, -1, -1), label, box)
            after = instance_scores(probs[len(chunk) + b].expand(n, -1, -1), boxes[len(chunk) + b].expand(n, -1, -1),
                                    label, box)
            for row, s0, s1 in zip(mine, before.tolist(), after.tolist()):
                ratios[row["instance_id"]] = s1 / max(s0, 1e-6)
    return ratios


def mistakenness(rows: list[dict[str, Any]], ann: Path, images: Path) -> dict[str, float]:
    """`_mistakenness`, with FiftyOne's notices kept off stdout, where the benchmark prints its JSON."""
    from eive_audit.reports.fiftyone_push import stdout_to_stderr

    with stdout_to_stderr():
        return _mistakenness(rows, ann, images)


def _mistakenness(rows: list[dict[str, Any]], ann: Path, images: Path) -> dict[str, float]:
    """FiftyOne Brain's mistakenness, as an instance ranking. Brain scores GT objects (how likely their label
    is wrong, given the predictions): a tp / dup / fn instance takes its GT object's larger of
    `mistakenness` and `mistakenness_loc`, or 1 when Brain calls that GT spurious; an fp takes 1 when Brain
    calls it a possibly missing GT object, else 0."""
    import fiftyone as fo
    import fiftyone.brain as fob

    from eive_audit.pipeline.sources import CocoSource, ImageRecord

    source = CocoSource(ann, images)
    dataset = fo.Dataset()
    by_image: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    samples = []
    for record in source:
        if not isinstance(record, ImageRecord):
            continue
        w, h = record.width, record.height

        def rel(x0: float, y0: float, x1: float, y1: float) -> list[float]:
            return [x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h]

        gts = [fo.Detection(label=name, bounding_box=rel(*box), annotation_id=int(ann_id))
               for name, box, ann_id in zip(record.names, record.boxes.tolist(), record.annotation_ids)]
        preds = [fo.Detection(label=row["label_name"], confidence=row["score"], audit_instance=row["instance_id"],
                              bounding_box=rel(row["pred_x0"], row["pred_y0"], row["pred_x1"], row["pred_y1"]))
                 for row in by_image.get(record.image_id, []) if row["outcome"] != "fn"]
        samples.append(fo.Sample(filepath=str(record.path), ground_truth=fo.Detections(detections=gts),
                                 predictions=fo.Detections(detections=preds)))
    dataset.add_samples(samples, progress=False)
    fob.compute_mistakenness(dataset, "predictions", label_field="ground_truth", progress=False)
    gt_score: dict[int, float] = {}
    pred_score: dict[str, float] = {}
    for sample in dataset:
        for det in sample.ground_truth.detections:
            if det.get_field("possible_spurious") if det.has_field("possible_spurious") else False:
                gt_score[det.annotation_id] = 1.0
            else:
                values = [det.get_field(f) for f in ("mistakenness", "mistakenness_loc") if det.has_field(f)]
                gt_score[det.annotation_id] = max([v for v in values if v is not None], default=0.0)
        for det in sample.predictions.detections:
            missing = det.get_field("possible_missing") if det.has_field("possible_missing") else False
            pred_score[det.audit_instance] = 1.0 if missing else 0.0
    dataset.delete()
    return {row["instance_id"]: gt_score.get(row["gt_annotation_id"], 0.0) if row["gt_annotation_id"] is not None
            else pred_score.get(row["instance_id"], 0.0) for row in rows}


def ranking_metrics(scores: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """AUROC, precision@k and recall@100 of a ranking (higher score = reviewed first; ties keep row order)."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]
    metrics = {"auroc": float(roc_auc_score(positive, scores))}
    metrics |= {f"precision@{k}": float(hits[:k].mean()) for k in KS}
    metrics["recall@100"] = float(hits[:100].sum() / max(positive.sum(), 1))
    return {k: round(v, 4) for k, v in metrics.items()}


def top_cue_on_cue(store: Path, run_id: str, ann: Path) -> dict[str, Any]:
    """Where the cued class's largest candidate cue sits: the share of its exemplars, and of all its
    members, whose off-object peak cell overlaps a planted cue box of the same image."""
    from eive_audit.storage.catalog import query

    cue = query(store, "SELECT cue_id, support, verification_drop, exemplar_ids FROM findings WHERE run_id = ? "
                       "AND label_name = ? AND explainer = 'eive' ORDER BY support DESC, cue_id LIMIT 1",
                [run_id, CUED_CATEGORY]).to_pylist()
    if not cue:
        return {"cue_id": None}
    members = query(store, "SELECT instance_id, image_id, peak_x, peak_y FROM instances WHERE run_id = ? AND cue_id = ?",
                    [run_id, cue[0]["cue_id"]]).to_pylist()
    boxes: dict[int, list[list[float]]] = {}
    for c in json.loads(ann.read_text())["cues"]:
        boxes.setdefault(c["image_id"], []).append(c["bbox"])
    half = 4.0  # half a grid cell of the shipped model (stride 8) in pixels of the 128-px images

    def on_cue(row: dict[str, Any]) -> bool:
        return any(x - half < row["peak_x"] < x + w + half and y - half < row["peak_y"] < y + h + half
                   for x, y, w, h in boxes.get(row["image_id"], []))

    exemplars = set(cue[0]["exemplar_ids"])
    return {"cue_id": cue[0]["cue_id"], "support": cue[0]["support"], "verification_drop": cue[0]["verification_drop"],
            "exemplars_on_cue": round(float(np.mean([on_cue(r) for r in members if r["instance_id"] in exemplars])), 4),
            "members_on_cue": round(float(np.mean([on_cue(r) for r in members])), 4)}


def run(model: str, n_val: int, seed: int, work: Path) -> dict[str, Any]:
    from eive_audit.flows.audit import audit
    from eive_audit.pipeline.config import AuditConfig
    from eive_audit.storage.catalog import query

    started = time.perf_counter()
    ann = generate(work / "data", 0, n_val, seed)["val"]
    images = work / "data" / "images" / "val"
    summary = audit(AuditConfig(images=images, coco=ann, out=work / "store", model=model, review={"report": False}))
    rows = query(work / "store", "SELECT * FROM instances WHERE run_id = ? AND explainer = 'eive' ORDER BY instance_id",
                 [summary["run_id"]]).to_pylist()
    ratios = counterfactual_ratios(DetrAdapter.load(model), rows, ann, images)
    positive = np.array([ratios[row["instance_id"]] <= 0.5 for row in rows])
    rng = np.random.default_rng(seed)
    mistaken = mistakenness(rows, ann, images)
    rankings = {
        "ours": np.array([row["spurious_score"] for row in rows], dtype=float),
        "random": rng.random(len(rows)),
        "1-confidence": np.array([1 - row["score"] for row in rows]),
        "mistakenness": np.array([mistaken[row["instance_id"]] for row in rows]),
    }
    by_outcome: dict[str, int] = {}
    for row, p in zip(rows, positive):
        if p:
            by_outcome[row["outcome"]] = by_outcome.get(row["outcome"], 0) + 1
    return {"rankings": {name: ranking_metrics(scores, positive) for name, scores in rankings.items()},
            "n_instances": len(rows), "n_positive": int(positive.sum()), "positives_by_outcome": by_outcome,
            "top_cue": top_cue_on_cue(work / "store", summary["run_id"], ann), "model": model, "n_val": n_val,
            "seed": seed, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--n-val", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--quick", action="store_true", help="120 images: a couple of minutes on CPU")
    parser.add_argument("--work", type=Path, default=None, help="keep data and store here (default: a temp dir)")
    args = parser.parse_args()
    n_val = 120 if args.quick else args.n_val
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(work / "fiftyone-db"))
        print(json.dumps(run(args.model, n_val, args.seed, work)))


if __name__ == "__main__":
    main()
