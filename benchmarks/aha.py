"""AHA, the learned explainer (issue 20, METHODS.md 3d), against the other explainers of each task, on the
shipped ViT and the shipped detector with their shipped AHA explainers. Prints one JSON object.

Every figure comes from the benchmark of the task, run here with AHA added, on a fresh synthetic val split
(a seed no model or explainer was trained on):
- the ViT (`vit.py`'s `measure`): per explainer `time_ratio` (explain() seconds per image over a bare
  batched forward's), over the correctly classified images EPG and pointing against the object box, and
  deletion / insertion AUC of the class probability (blur baseline); class sensitivity;
- the detector (`baselines.py`'s `shipped_quality`, through `pipeline.audit.audit_batch` as an audit calls
  the explainers): `time_ratio` per explained instance, and over the true positives EPG, pointing and
  deletion / insertion AUC;
- `aha` is the decoder's map in one forward; `aha+refine<k>` the same map after k steps of test-time
  refinement (`--refine-steps`);
- `training`: what the shipped explainers' training cost, read from their `training_config.json`;
- `cue_recovery`: the planted-cue recovery of the task's benchmark (`vit.cue_recovery`, and
  `spurious_recovery.run` for the detector) with the findings step reading AHA's maps, beside the same with
  the task's usual explainer (LeGrad for the ViT, EIVE for the detector).

    python benchmarks/aha.py --threads 2                     # the defaults (96 ViT, 16 detector images)
    python benchmarks/aha.py --threads 1 --vit-images 48 --drise-masks 300 --recovery-images 80   # README's: 12 min
    python benchmarks/aha.py --vit-images 24 --det-images 6 --no-recovery   # a few minutes
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import baselines
import spurious_recovery
import vit

from eive_audit.explainers import get_explainer
from eive_audit.explainers.base import Explainer
from eive_audit.pipeline.config import AHA_DIR, AhaSettings
from eive_audit.pipeline.models.detr import resolve_device
from eive_audit.pipeline.models.locate import resolve_model_path
from eive_audit.pipeline.models.vit import ViTAdapter

VIT_OTHERS = ("legrad", "cdam", "iba", "rollout", "raw-attention", "grad-cam")
DETECTOR_OTHERS = ("eive", "legrad-detr", "cdam-detr", "drise", "chefer", "odam", "rollout", "raw-attention")


def aha_variants(refine_steps: int, model: str) -> dict[str, Explainer]:
    """AHA without refinement and with `refine_steps` steps, reading the model's shipped explainer (MODEL/aha,
    where an audit's `--explainer aha` alone finds it)."""
    directory = Path(resolve_model_path(model)) / AHA_DIR
    return {"aha": get_explainer("aha", AhaSettings(model=directory)),
            f"aha+refine{refine_steps}": get_explainer("aha", AhaSettings(model=directory, refine_steps=refine_steps))}


def vit_part(args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    adapter = ViTAdapter.load("default-vit", device)
    measured = [vit.Measured(name, get_explainer(name)) for name in VIT_OTHERS]
    measured += [vit.Measured(name, e) for name, e in aha_variants(args.refine_steps, "default-vit").items()]
    split = vit.make_split(work / "vit", args.vit_images, vit.SYNTH_SEED, adapter)
    options = argparse.Namespace(steps=args.steps, forward_batch=args.forward_batch, batch_size=16,
                                 sensitivity_images=args.vit_images, model="default-vit", device=str(device),
                                 seed=vit.SYNTH_SEED)
    per_forward = vit.measure(adapter, split, measured, options)
    result: dict[str, Any] = {"explainers": {m.name: m.summary(per_forward) for m in measured},
                              "images": args.vit_images, "seed": vit.SYNTH_SEED,
                              "bare_forward_s_per_image": float(f"{per_forward:.4g}")}
    if args.recovery:
        result["cue_recovery"] = {name: vit.cue_recovery(adapter, split, work / f"vit-{name}", options, name)
                                  for name in ("aha", "legrad")}
    return result


def detector_part(args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    options = argparse.Namespace(images=args.det_images, batch_size=4, score_threshold=0.5, max_detections=100,
                                 steps=args.steps, drise_masks=args.drise_masks, forward_batch=args.forward_batch)
    measured, n_images, per_forward = baselines.shipped_quality(options, device, "default", DETECTOR_OTHERS,
                                                                aha_variants(args.refine_steps, "default"))
    result: dict[str, Any] = {"explainers": {m.name: m.summary(per_forward) for m in measured},
                              "images": n_images, "seed": baselines.SYNTH_SEED,
                              "bare_forward_s_per_image": float(f"{per_forward:.4g}")}
    if args.recovery:
        result["cue_recovery"] = {
            name: {k: v for k, v in spurious_recovery.run("default", args.recovery_images, args.recovery_seed,
                                                          work / f"det-{name}", explainer=name).items()
                   if k in ("n_instances", "n_positive", "rankings", "top_cue", "audit_seconds")}
            for name in ("aha", "eive")}
    return result


def training_cost() -> dict[str, Any]:
    """The shipped explainers' training: steps, seconds, device and data, from their training_config.json."""
    cost = {}
    for model in ("default", "default-vit"):
        recorded = json.loads((Path(resolve_model_path(model)) / AHA_DIR / "training_config.json").read_text())
        config, summary = recorded["config"], recorded["summary"]
        cost[model] = {"steps": summary["steps"], "train_seconds": summary["train_seconds"], "device": summary["device"],
                       "images": summary["images"], "batch_size": config["batch_size"], "threads": config["threads"]}
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit-images", type=int, default=96, help="synthetic val images for the ViT")
    parser.add_argument("--det-images", type=int, default=16, help="synthetic val images for the detector")
    parser.add_argument("--refine-steps", type=int, default=3, help="test-time refinement steps of aha+refine")
    parser.add_argument("--steps", type=int, default=10, help="deletion / insertion steps")
    parser.add_argument("--forward-batch", type=int, default=64, help="perturbed images per forward")
    parser.add_argument("--drise-masks", type=int, default=500)
    parser.add_argument("--no-recovery", dest="recovery", action="store_false", help="skip the planted-cue audits")
    parser.add_argument("--recovery-images", type=int, default=120, help="val images of the detector's recovery")
    parser.add_argument("--recovery-seed", type=int, default=4242)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"vit": vit_part(args, device, Path(tmp)), "detector": detector_part(args, device, Path(tmp)),
                  "training": training_cost()}
    result["setup"] = {"steps": args.steps, "refine_steps": args.refine_steps, "device": str(device),
                       "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
