"""AAJTS (METHODS.md 1d) against plain training: detection accuracy, EIVE's explanations, and the planted cue.

Both arms fine-tune the same initial model (by default the shipped one) for the same steps on the same
synthetic train split, with the same seed, data order and schedule; they differ only in `aajts`. Each
trained model is then measured on one fresh synthetic val split (seed 1234, never trained on):
- COCO AP / AP50 / AP75 (`pipeline.evaluation.coco_metrics`);
- EIVE over the correct detections (tp) of a full audit (`flows.audit`, faithfulness on every instance,
  blur baseline): EPG = mean `mass_in_gt`, pointing = mean `peak_in_gt`, mean deletion and insertion AUC;
- cue reliance (`benchmarks/cue_reliance.py`): recall of the cued class with and without its cue;
- whether the audit still finds the cue: AUROC of `spurious_score` against the counterfactual ground truth
  of `benchmarks/spurious_recovery.py`, flagged instances, candidate and confirmed cues.
Prints one JSON object {"without": {...}, "with": {...}, "setup": {...}}.

    python benchmarks/aajts.py --quick          # a few minutes on a CPU
    python benchmarks/aajts.py                  # 1000 steps per arm: about an hour on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cue_reliance import measure as cue_reliance
from eive_audit.pipeline.evaluation import coco_metrics
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.models.locate import DEFAULT_MODEL_DIR
from eive_audit.pipeline.sources import CocoSource
from eive_audit.pipeline.sources.synthetic import generate
from eive_audit.pipeline.train import TrainConfig, train
from spurious_recovery import counterfactual_ratios, ranking_metrics, top_cue_on_cue

ARMS = {"without": False, "with": True}
VAL_SEED = 1234
CUE_KEYS = ("cued_recall_with_cue", "cued_recall_without_cue", "recall_drop")


def _mean(values: list[Any]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return round(statistics.fmean(kept), 4) if kept else None


def explanation_metrics(rows: list[dict[str, Any]]) -> dict[str, float | int | None]:
    """EPG, pointing and faithfulness of EIVE over the audit's correct detections."""
    tp = [row for row in rows if row["outcome"] == "tp"]
    return {"tp": len(tp), **{name: _mean([row[column] for row in tp]) for name, column in (
        ("epg", "mass_in_gt"), ("pointing", "peak_in_gt"), ("insertion_auc", "insertion_auc"),
        ("deletion_auc", "deletion_auc"))}}


def audit_findings(model: Path, rows: list[dict[str, Any]], store: Path, run_id: str, ann: Path,
                   images: Path) -> dict[str, Any]:
    """Does the audit still find the cue: spurious_score ranking against the counterfactual ground truth
    (AUROC only when both classes occur), flagged instances, candidate and confirmed cues."""
    from eive_audit.storage.catalog import query

    ratios = counterfactual_ratios(DetrAdapter.load(model), rows, ann, images)
    positive = np.array([ratios[row["instance_id"]] <= 0.5 for row in rows])
    scores = np.array([row["spurious_score"] for row in rows], dtype=float)
    ranking = ranking_metrics(scores, positive) if 0 < positive.sum() < len(rows) else {}
    cues = query(store, "SELECT confirmed FROM findings WHERE run_id = ? AND explainer = 'eive'", [run_id]).to_pylist()
    flags = ("flag_off_object", "flag_background_fp", "flag_miss_elsewhere")
    return {"spurious_auroc": ranking.get("auroc"), "spurious_precision@10": ranking.get("precision@10"),
            "n_instances": len(rows), "n_cue_reliant": int(positive.sum()),
            "flagged": sum(any(row[f] for f in flags) for row in rows), "candidate_cues": len(cues),
            "confirmed_cues": sum(c["confirmed"] for c in cues),
            "top_cue_members_on_cue": top_cue_on_cue(store, run_id, ann).get("members_on_cue")}


def evaluate(model: Path, ann: Path, images: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one trained model on the val split."""
    from eive_audit.flows.audit import audit
    from eive_audit.pipeline.config import AuditConfig
    from eive_audit.storage.catalog import query

    accuracy = coco_metrics(DetrAdapter.load(model), CocoSource(ann, images))
    summary = audit(AuditConfig(images=images, coco=ann, out=work, model=str(model), review={"report": False},
                                faithfulness={"instances": "all", "steps": args.faithfulness_steps}))
    rows = query(work, "SELECT * FROM instances WHERE run_id = ? AND explainer = 'eive' ORDER BY instance_id",
                 [summary["run_id"]]).to_pylist()
    cue = cue_reliance(str(model), args.n_val, VAL_SEED)
    return {**{k: accuracy[k] for k in ("AP", "AP50", "AP75")}, **explanation_metrics(rows),
            **{k: cue[k] for k in CUE_KEYS},
            **audit_findings(model, rows, work, summary["run_id"], ann, images)}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    train_ann = generate(work / "train", args.n_train, 0, args.train_seed)["train"]
    val_ann = generate(work / "val", 0, args.n_val, VAL_SEED)["val"]
    result: dict[str, Any] = {}
    for arm, aajts in ARMS.items():
        config = TrainConfig(coco=train_ann, images=work / "train" / "images" / "train", out=work / arm / "model",
                             init=args.init, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             warmup_steps=args.warmup_steps, checkpoint_every=args.steps, seed=args.seed,
                             device=args.device, aajts=aajts, lambda_in=args.lambda_in, lambda_stab=args.lambda_stab)
        trained = train(config)
        figures = evaluate(config.out, val_ann, work / "val" / "images" / "val", work / arm / "store", args)
        result[arm] = {**figures, **{k: round(v, 4) for k, v in trained.items() if k.startswith("final_")},
                       "train_seconds": trained["train_seconds"]}
    init = "shipped model" if args.init == DEFAULT_MODEL_DIR else str(args.init)
    result["setup"] = {"init": init, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                       "warmup_steps": args.warmup_steps, "seed": args.seed, "lambda_in": args.lambda_in,
                       "lambda_stab": args.lambda_stab, "train_images": args.n_train, "train_seed": args.train_seed,
                       "val_images": args.n_val, "val_seed": VAL_SEED, "faithfulness_steps": args.faithfulness_steps,
                       "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small CPU run: overrides the sizes below")
    parser.add_argument("--init", type=Path, default=DEFAULT_MODEL_DIR, help="model both arms fine-tune")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambda-in", type=float, default=0.5)
    parser.add_argument("--lambda-stab", type=float, default=0.1)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--train-seed", type=int, default=7)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--faithfulness-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=None, help="keep data, models and stores here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.warmup_steps, args.n_train, args.n_val = 20, 8, 5, 32, 24
        args.faithfulness_steps = 4
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(args, args.work or Path(tmp))))


if __name__ == "__main__":
    main()
