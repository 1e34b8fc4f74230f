"""EIVE against the detection explainer baselines, and EIVE's layer-fusion ablation (METHODS.md 1c, 2, 4).

Quality, on the shipped model over a fresh synthetic val set (seed 1234): every explainer explains every
kept detection and missed GT box through `pipeline.audit.audit_batch`, exactly as an audit does. Over the
correct detections (tp): EPG = mean `mass_in_gt` (energy-based pointing game), pointing = mean `peak_in_gt`,
and mean deletion / insertion AUC (`pipeline.metrics.faithfulness`, blur baseline, --steps steps; lower
deletion and higher insertion are better).

Cost: `time_ratio` = seconds of explain() per explained instance / seconds per image of a bare batched
forward (`adapter.predict`, no attention capture), both timed on the same batches in turn, so machine drift
hits all alike. On the shipped model over the val set above, and (`time_ratio_detr_r50`) on random-init
DETR-R50 at 800 px over coco_tiny val images (median of --repeats, interleaved). D-RISE's cost grows
linearly with its number of masks, which is in `setup`.

Fusion ablation: EIVE with each fusion, query tracking off (`<fusion>`) and on (`<fusion>+track`), on the
same instances and metrics. Prints one JSON object.

    python benchmarks/baselines.py --quick --threads 1     # a few minutes on a CPU
    python benchmarks/baselines.py --threads 1             # the defaults: about 15 minutes on 2 busy CPU cores
    python benchmarks/baselines.py --quick --threads 1 --deformable-only --deformable-model DIR   # deformable rows

Deformable rows (`--deformable-model`, a deformable-detr-small trained by `eive-audit train`): the explainers
that take a multi-scale deformable model (`DEFORMABLE`), quality and cost on that model, cost on random-init
Deformable DETR and RT-DETR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from eive_audit.explainers import get_explainer
from eive_audit.explainers.base import Explainer
from eive_audit.explainers.eive import DEFAULT_FUSION, FUSIONS
from eive_audit.pipeline.audit import audit_batch, faithfulness_of_rows
from eive_audit.pipeline.batching import ImageBatch, iter_batches
from eive_audit.pipeline.config import DriseSettings, EiveSettings, FindingsConfig
from eive_audit.pipeline.metrics.faithfulness import FaithfulnessConfig
from eive_audit.pipeline.models.detr import DetrAdapter, resolve_device
from eive_audit.pipeline.models.families import write_random_model
from eive_audit.pipeline.models.labels import label_to_category
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.sources import CocoSource
from eive_audit.pipeline.sources.decode import decode_rgb
from eive_audit.pipeline.sources.synthetic import generate

BASELINES = ("raw-attention", "rollout", "chefer", "odam", "drise", "legrad-detr", "cdam-detr")
DEFORMABLE = ("eive", "raw-attention", "odam", "drise")  # the explainers that take a multi-scale deformable model
COCO_TINY_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny" / "val2017"
SYNTH_SEED = 1234
# EIVE fusion ablation: name -> (fusion, query tracking)
VARIANTS = {f"{fusion}{'+track' if track else ''}": (fusion, track) for fusion in FUSIONS for track in (False, True)}
# Ablation entries whose maps equal a baseline's up to scale (so every score is equal): not computed twice.
SAME_MAPS = {f"{DEFAULT_FUSION}+track": "eive", "last": "raw-attention"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@dataclass
class Measured:
    """An explainer under a benchmark name (EIVE variants share the class name `eive`) that times its calls."""

    name: str
    inner: Explainer
    seconds: float = 0.0
    instances: int = 0
    tp: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in ("epg", "pointing", "deletion_auc",
                                                                                  "insertion_auc")})

    def explain(self, model: DetrAdapter, batch: PixelBatch, outputs: Any, targets: Targets) -> torch.Tensor:
        start = time.perf_counter()
        maps = self.inner.explain(model, batch, outputs, targets)
        _sync(model.device)
        self.seconds += time.perf_counter() - start
        self.instances += len(targets)
        return maps

    def summary(self, seconds_per_forward: float) -> dict[str, float | int]:
        means = {k: round(statistics.fmean(v), 4) if v else None for k, v in self.tp.items()}
        ratio = self.seconds / max(self.instances, 1) / seconds_per_forward
        return {"time_ratio": float(f"{ratio:.4g}"), **means, "tp": len(self.tp["epg"])}


def _explainers(drise: dict[str, int], names: tuple[str, ...], ablation: bool) -> list[Measured]:
    baselines = [Measured(n, get_explainer(n, DriseSettings(**drise) if n == "drise" else None)) for n in names]
    return baselines + [Measured(name, get_explainer("eive", EiveSettings(fusion=fusion, track=track)))
                        for name, (fusion, track) in VARIANTS.items() if ablation and name not in SAME_MAPS]


def shipped_quality(args: argparse.Namespace, device: torch.device, model: str = "default",
                    names: tuple[str, ...] = ("eive", *BASELINES),
                    extra: dict[str, Explainer] | None = None) -> tuple[list[Measured], int, float]:
    """Every explainer (`names`, then `extra` under their names) over a fresh synthetic val set: timings,
    localisation and faithfulness over tp; also the number of images and the seconds per image of the bare
    batched forward. The fusion ablation runs on the shipped model only, and not beside `extra`."""
    adapter = DetrAdapter.load(model, device)
    measured = _explainers({"n_masks": args.drise_masks, "batch_size": args.forward_batch}, names,
                           ablation=model == "default" and not extra)
    measured += [Measured(name, explainer) for name, explainer in (extra or {}).items()]
    faithfulness = FaithfulnessConfig(steps=args.steps, batch_size=args.forward_batch)
    bare, n_images = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        annotations = generate(Path(tmp), n_train=0, n_val=args.images, seed=SYNTH_SEED)["val"]
        source = CocoSource(annotations, Path(tmp) / "images" / "val")
        label_map, _ = label_to_category(adapter.label_names, source.categories)
        stream = (item for image_id in source.image_ids for item in source.read(image_id))
        batches = [item for item in iter_batches(stream, args.batch_size, adapter.preprocess_config.longest_edge)
                   if isinstance(item, ImageBatch)]
        audit_batch(adapter, measured, batches[0], label_map, args.score_threshold, args.max_detections,
                    findings=FindingsConfig())  # warm-up
        for m in measured:
            m.seconds, m.instances = 0.0, 0
        for item in batches:
            pixels = adapter.preprocess(item.images, item.sizes)
            bare += _seconds(lambda: adapter.predict(pixels.pixel_values, pixels.pixel_mask), device)
            n_images += len(item.images)
            rows = audit_batch(adapter, measured, item, label_map, args.score_threshold, args.max_detections,
                               findings=FindingsConfig())
            for m in measured:
                chosen = [(row, entry["map"]) for row, entry in zip(rows.instances, rows.maps)
                          if row["explainer"] == m.name and row["outcome"] == "tp"]
                if not chosen:
                    continue
                result = faithfulness_of_rows(adapter, item, [r for r, _ in chosen], [mp for _, mp in chosen],
                                              label_map, faithfulness)
                # An all-zero map (e.g. no positive gradient evidence) has no scores: it counts as finding nothing.
                m.tp["epg"] += [r["mass_in_gt"] or 0.0 for r, _ in chosen]
                m.tp["pointing"] += [float(r["peak_in_gt"] or 0.0) for r, _ in chosen]
                m.tp["deletion_auc"] += result.deletion_auc.tolist()
                m.tp["insertion_auc"] += result.insertion_auc.tolist()
    return measured, n_images, bare / n_images


def random_init_cost(args: argparse.Namespace, device: torch.device, family: str = "detr-r50",
                     names: tuple[str, ...] = ("eive", *BASELINES)) -> tuple[dict[str, float], dict[str, Any]]:
    """Cost ratio of each explainer on a random-init real-size model over coco_tiny val images at its input
    size (DETR-R50 and Deformable DETR 800 px, RT-DETR 640 px)."""
    with tempfile.TemporaryDirectory() as tmp:
        adapter = DetrAdapter.load(write_random_model(family, [f"LABEL_{i}" for i in range(80)], Path(tmp)), device)
    images = [decode_rgb(p, adapter.preprocess_config.longest_edge)
              for p in sorted(COCO_TINY_VAL.glob("*.jpg"))[:args.detr_images]]
    batch = adapter.preprocess(images)
    with torch.inference_mode():
        outputs = adapter.forward(batch)  # also installs transformers' lazy hooks: a warm-up
        detections = adapter.postprocess(outputs, batch, score_threshold=0.0, max_detections=args.detr_instances)
    index = torch.cat([torch.full_like(d.queries, i) for i, d in enumerate(detections)]).to(device)
    queries = torch.cat([d.queries for d in detections]).to(device)
    targets = Targets(index, queries, torch.cat([d.labels for d in detections]).to(device),
                      outputs.boxes[index, queries].float().clone())
    fns: dict[str, Callable[[], object]] = {"bare": lambda: adapter.predict(batch.pixel_values, batch.pixel_mask)}
    for name in names:
        explainer = get_explainer(name, DriseSettings(n_masks=args.detr_drise_masks, batch_size=args.forward_batch)
                                  if name == "drise" else None)
        fns[name] = lambda e=explainer: e.explain(adapter, batch, outputs, targets)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(_seconds(fn, device))
    per_image = statistics.median(times.pop("bare")) / len(images)
    ratios = {name: float(f"{statistics.median(t) / len(targets) / per_image:.4g}") for name, t in times.items()}
    return ratios, {"images": len(images), "instances": len(targets), "input": list(batch.pixel_values.shape[-2:]),
                    "bare_forward_s_per_image": float(f"{per_image:.4g}"), "drise_masks": args.detr_drise_masks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small CPU run: overrides the sizes below")
    parser.add_argument("--images", type=int, default=20, help="synthetic val images for the quality figures")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--max-detections", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="deletion / insertion steps")
    parser.add_argument("--drise-masks", type=int, default=500)
    parser.add_argument("--forward-batch", type=int, default=64, help="perturbed images per forward (D-RISE, AUCs)")
    parser.add_argument("--detr-images", type=int, default=2)
    parser.add_argument("--detr-instances", type=int, default=4, help="explained queries per DETR-R50 image")
    parser.add_argument("--detr-drise-masks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the DETR-R50 timings")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--deformable-model", default=None,
                        help="a trained deformable-detr-small directory: adds the deformable rows (quality on it, "
                             "cost on random-init Deformable DETR and RT-DETR)")
    parser.add_argument("--deformable-only", action="store_true", help="only the deformable rows")
    args = parser.parse_args()
    if args.deformable_only and not args.deformable_model:
        parser.error("--deformable-only needs --deformable-model")
    if args.quick:
        args.images, args.steps, args.drise_masks = 8, 5, 64
        args.detr_images, args.detr_instances, args.detr_drise_masks, args.repeats = 1, 2, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = time.perf_counter()
    result: dict[str, Any] = {}
    if not args.deformable_only:
        result = single_scale(args, device)
    if args.deformable_model:
        result["deformable"] = deformable(args, device)
    result["setup"] = {**result.get("setup", {}), "device": str(device), "threads": torch.get_num_threads(),
                       "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result))


def single_scale(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The shipped model's quality and the fusion ablation; costs on it and on random-init DETR-R50."""
    measured, n_images, per_forward = shipped_quality(args, device)
    detr_ratios, detr_setup = random_init_cost(args, device)
    summaries = {m.name: m.summary(per_forward) for m in measured}
    explainers = {name: {**summaries[name], "time_ratio_detr_r50": detr_ratios[name]} for name in ("eive", *BASELINES)}
    quality = {name: {k: v for k, v in summary.items() if k != "time_ratio"} for name, summary in summaries.items()}
    ablation = {name: quality[SAME_MAPS.get(name, name)] for name in VARIANTS}
    setup = {"synthetic_seed": SYNTH_SEED, "steps": args.steps, "score_threshold": args.score_threshold,
             "drise_masks": args.drise_masks,
             "shipped": {"images": n_images, "bare_forward_s_per_image": float(f"{per_forward:.4g}")},
             "detr_r50": detr_setup}
    return {"explainers": explainers, "fusion_ablation": ablation, "setup": setup}


def deformable(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The explainers that take a deformable model: quality and cost on the trained deformable-detr-small,
    cost on random-init Deformable DETR (800 px) and RT-DETR R50 (640 px)."""
    measured, n_images, per_forward = shipped_quality(args, device, args.deformable_model, DEFORMABLE)
    costs = {family: random_init_cost(args, device, family, DEFORMABLE) for family in ("deformable-detr", "rt-detr")}
    explainers = {m.name: {**m.summary(per_forward),
                           **{f"time_ratio_{f.replace('-', '_')}": ratios[m.name] for f, (ratios, _) in costs.items()}}
                  for m in measured}
    setup = {"model": str(args.deformable_model), "images": n_images, "score_threshold": args.score_threshold,
             "drise_masks": args.drise_masks,
             "bare_forward_s_per_image": float(f"{per_forward:.4g}"), **{f: s for f, (_, s) in costs.items()}}
    return {"explainers": explainers, "setup": setup}

if __name__ == "__main__":
    main()
