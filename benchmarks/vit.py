"""The ViT explainers on the shipped ViT (issue 19): cost, localisation, faithfulness, class sensitivity, and
planted-cue recovery by the classification audit. Prints one JSON object.

Data: a fresh synthetic planted-cue classification val split (`synthetic_classify.generate_classify`, seed
--seed, never used in training), one shape per image with its object box, the checkerboard cue beside the
cued class's objects and beside a share of the others.

Per explainer, each image explained for its true class (and, for class sensitivity, for its most probable
other class), as an audit calls it (after the captured forward, in inference mode):
- `time_ratio`: seconds of explain() per image / seconds per image of a bare batched forward
  (`adapter.predict`, no capture; the median of three), timed in turn on the same batches of the same run;
- over the correctly classified images: `epg` = mean `mass_in_gt` and `pointing` = mean `peak_in_gt`
  against the object box (`pipeline.metrics.localization`), `deletion_auc` / `insertion_auc` of the class
  probability (`pipeline.metrics.faithfulness`, blur baseline, --steps steps; lower deletion and higher
  insertion are better);
- class sensitivity (CDAM's benchmark: a class-discriminative map changes with the class asked for): over
  those among the first --sensitivity-images, `class_sensitivity` = 1 - mean cosine between the true-class
  map and the other class's, and `rank_correlation` = their mean Spearman correlation (lower is more
  class-sensitive); pairs where either map is constant are left out (`sensitivity_pairs` counts the rest).

Planted-cue recovery (`cue_recovery`): the real audit (`flows.audit.audit`, task classify, findings on)
of the same split; ground truth it never sees: a prediction depends on the cue when, on the image re-rendered
without its cue (`synthetic_classify.render_counterfactual`), the predicted class changes or its probability
falls by half or more; predictions on images without a cue do not. AUROC and precision@k of the audit's
`spurious_score` against 1 - confidence and random (`spurious_recovery.ranking_metrics`).

    python benchmarks/vit.py                                   # the defaults: about 10 minutes on 2 CPU cores
    python benchmarks/vit.py --images 24 --explainers legrad,iba --no-audit
    python benchmarks/vit.py --iba-sweep                       # IBA's settings, the table in explainers/iba.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from baselines import _seconds, _sync
from spurious_recovery import ranking_metrics

from eive_audit.explainers import get_explainer
from eive_audit.explainers.base import Explainer
from eive_audit.pipeline.config import ExplainerSettings, FaithfulnessConfig, IbaSettings
from eive_audit.pipeline.metrics.faithfulness import deletion_insertion
from eive_audit.pipeline.metrics.localization import localization_scores
from eive_audit.pipeline.models.detr import resolve_device
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.models.vit import WHOLE_IMAGE, ViTAdapter
from eive_audit.pipeline.sources.decode import decode_rgb
from eive_audit.pipeline.sources.synthetic_classify import generate_classify, render_counterfactual

EXPLAINERS = ("legrad", "cdam", "cdam-smooth", "cdam-integrated", "iba", "rollout", "raw-attention", "grad-cam",
              "score-cam")
SYNTH_SEED = 2719  # the val split's seed: fresh, not a seed the shipped ViT was trained or evaluated on
METRICS = ("epg", "pointing", "deletion_auc", "insertion_auc", "cosine", "rank_correlation")


@dataclass
class Split:
    """A synthetic val split in memory: its index and image folder, uint8 pictures, class ids, object boxes
    (pixel xyxy [n, 4]) and image ids."""

    index: Path
    images: Path
    pictures: list[torch.Tensor]
    labels: torch.Tensor
    boxes: torch.Tensor
    image_ids: list[int]


def make_split(work: Path, n: int, seed: int, adapter: ViTAdapter) -> Split:
    index = generate_classify(work / "data", 0, n, seed)["val"]
    raw = json.loads(index.read_text())
    label_of = {name: label for label, name in adapter.label_names.items()}
    images = work / "data" / "images" / "val"
    return Split(index, images, [decode_rgb(images / image["file"], None) for image in raw["images"]],
                 torch.tensor([label_of[image["label"]] for image in raw["images"]]),
                 torch.tensor([image["boxes"][0] for image in raw["images"]], dtype=torch.float32),
                 [image["id"] for image in raw["images"]])


@dataclass
class Measured:
    """One explainer under a benchmark name: its explain() seconds and images, and its per-image scores."""

    name: str
    inner: Explainer
    seconds: float = 0.0
    images: int = 0
    scores: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in METRICS})

    def summary(self, seconds_per_forward: float) -> dict[str, Any]:
        means = {k: round(statistics.fmean(v), 4) if v else None for k, v in self.scores.items()}
        cosine = means.pop("cosine")
        return {"time_ratio": float(f"{self.seconds / max(self.images, 1) / seconds_per_forward:.4g}"),
                **{k: means[k] for k in ("epg", "pointing", "deletion_auc", "insertion_auc")},
                "class_sensitivity": None if cosine is None else round(1 - cosine, 4),
                "rank_correlation": means["rank_correlation"], "sensitivity_pairs": len(self.scores["cosine"]),
                "correct": len(self.scores["epg"])}


def _targets(labels: torch.Tensor, images: torch.Tensor | None = None) -> Targets:
    """Target k: class labels[k] of image images[k] of the batch (default: image k), the whole image its box."""
    n, device = len(labels), labels.device
    return Targets(torch.arange(n, device=device) if images is None else images,
                   torch.zeros(n, dtype=torch.long, device=device), labels,
                   torch.tensor(WHOLE_IMAGE, device=device).expand(n, 4))


def _pair_scores(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float] | None:
    """Cosine and Spearman correlation of two maps, None when either is constant (no ranking to compare)."""
    x, y = a.flatten().double().cpu().numpy(), b.flatten().double().cpu().numpy()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))), float(spearmanr(x, y).statistic)


def measure(adapter: ViTAdapter, split: Split, measured: list[Measured], args: argparse.Namespace) -> float:
    """Run every explainer over the split in batches, scoring as the module docstring says (the other-class
    maps of the first --sensitivity-images images only); returns the seconds per image of the bare forward.
    Every explainer first runs once on two images, untimed (a warm-up)."""
    device, (h, w) = adapter.device, adapter.grid
    faithfulness = FaithfulnessConfig(steps=args.steps, batch_size=args.forward_batch)
    with torch.inference_mode():
        batch = adapter.preprocess(split.pictures[:2])
        outputs = adapter.forward(batch)
        for m in measured:
            m.inner.explain(adapter, batch, outputs, _targets(split.labels[:2].to(device)))
    bare, n_images = 0.0, 0
    for start in range(0, len(split.pictures), args.batch_size):
        pictures = split.pictures[start:start + args.batch_size]
        labels = split.labels[start:start + args.batch_size].to(device)
        batch = adapter.preprocess(pictures)
        bare += statistics.median(_seconds(lambda: adapter.predict(batch.pixel_values, batch.pixel_mask), device)
                                  for _ in range(3))  # the median of three, on a busy machine
        n_images += len(pictures)
        with torch.inference_mode():
            outputs = adapter.forward(batch)
            probs = adapter.class_probs(outputs.logits)
        other = probs.scatter(1, labels[:, None], -1.0).argmax(1)  # the most probable class that is not the true one
        correct = (probs.argmax(1) == labels).nonzero().flatten()
        paired = correct[correct + start < args.sensitivity_images]
        size = torch.tensor([pictures[0].shape[-1], pictures[0].shape[-2]] * 2, dtype=torch.float32)
        gt_boxes = (split.boxes[start:start + args.batch_size] / size * torch.tensor([w, h, w, h])).to(device)
        for m in measured:
            with torch.inference_mode():
                began = time.perf_counter()
                maps = m.inner.explain(adapter, batch, outputs, _targets(labels))
                _sync(device)
                m.seconds, m.images = m.seconds + time.perf_counter() - began, m.images + len(pictures)
                others = m.inner.explain(adapter, batch, outputs, _targets(other[paired], paired)) if len(paired) else maps[:0]
            if len(correct):
                score(m, adapter, batch, maps, labels, correct, gt_boxes, faithfulness)
            for k, other_map in zip(paired.tolist(), others):
                pair = _pair_scores(maps[k], other_map)
                if pair is not None:
                    m.scores["cosine"].append(pair[0])
                    m.scores["rank_correlation"].append(pair[1])
    return bare / max(n_images, 1)


def score(m: Measured, adapter: ViTAdapter, batch: Any, maps: torch.Tensor, labels: torch.Tensor,
          correct: torch.Tensor, gt_boxes: torch.Tensor, faithfulness: FaithfulnessConfig) -> None:
    """Add one batch's scores of its correctly classified images to `m`: localisation against the object box
    (grid units) and deletion / insertion of the class probability."""
    device, (h, w) = adapter.device, adapter.grid
    chosen = maps[correct]
    whole = torch.tensor([[0.0, 0.0, w, h]], device=device).expand(len(correct), 4)
    local = localization_scores(chosen, whole, torch.arange(len(correct), device=device), gt_boxes[correct])
    # An all-zero map (no positive evidence) has no scores: it counts as finding nothing.
    m.scores["epg"] += torch.nan_to_num(local["mass_in_gt"]).tolist()
    m.scores["pointing"] += torch.nan_to_num(local["peak_in_gt"]).tolist()
    with torch.inference_mode():
        result = deletion_insertion(adapter.predict, batch.pixel_values, batch.pixel_mask, chosen,
                                    _targets(labels[correct], correct), faithfulness)
    m.scores["deletion_auc"] += result.deletion_auc.tolist()
    m.scores["insertion_auc"] += result.insertion_auc.tolist()


def cue_dependence(adapter: ViTAdapter, split: Split) -> dict[int, bool]:
    """image id -> whether its prediction depends on its cue: on the image re-rendered without the cue the
    predicted class changes or its probability falls by half or more (False for an image without a cue)."""
    cued = sorted({cue["image_id"] for cue in json.loads(split.index.read_text())["cues"]})
    depends = {image_id: False for image_id in split.image_ids}
    position = {image_id: i for i, image_id in enumerate(split.image_ids)}
    for start in range(0, len(cued), 32):
        chunk = cued[start:start + 32]
        originals = [split.pictures[position[i]] for i in chunk]
        clean = [torch.from_numpy(np.array(render_counterfactual(split.index, i))).permute(2, 0, 1) for i in chunk]
        batch = adapter.preprocess(originals + clean)
        probs = adapter.predict(batch.pixel_values, batch.pixel_mask)[0][:, 0]
        before, after = probs[:len(chunk)], probs[len(chunk):]
        predicted = before.argmax(1, keepdim=True)
        p0, p1 = before.gather(1, predicted)[:, 0], after.gather(1, predicted)[:, 0]
        changed = (after.argmax(1, keepdim=True) != predicted)[:, 0] | (p1 <= 0.5 * p0)
        depends.update(zip(chunk, changed.tolist()))
    return depends


def cue_recovery(adapter: ViTAdapter, split: Split, work: Path, args: argparse.Namespace,
                 explainer: str | None = None) -> dict[str, Any]:
    """The classification audit of the split (findings on, `explainer` or else the audit's default
    explainers) and how its `spurious_score` ranks the predictions that depend on the cue (module docstring)."""
    from eive_audit.flows.audit import audit
    from eive_audit.pipeline.config import AuditConfig
    from eive_audit.storage.catalog import query

    chosen = {} if explainer is None else {"explainers": {explainer: {}}}
    config = AuditConfig(task="classify", images=split.images, index=split.index, out=work / "store",
                         model=args.model, device=args.device, review={"report": False}, **chosen)
    explainer = next(iter(config.explainers))
    started = time.perf_counter()
    summary = audit(config)
    seconds = time.perf_counter() - started
    rows = query(work / "store", "SELECT * FROM instances WHERE run_id = ? AND explainer = ? AND outcome IN "
                                 "('correct', 'wrong') ORDER BY instance_id", [summary["run_id"], explainer]).to_pylist()
    depends = cue_dependence(adapter, split)
    positive = np.array([depends[row["image_id"]] for row in rows])
    rankings = {"ours": np.array([row["spurious_score"] for row in rows], dtype=float),
                "1-confidence": np.array([1 - row["score"] for row in rows]),
                "random": np.random.default_rng(args.seed).random(len(rows))}
    result: dict[str, Any] = {"explainer": explainer, "predictions": len(rows), "depend_on_cue": int(positive.sum()),
                              "audit_seconds": round(seconds, 1)}
    if 0 < positive.sum() < len(rows):
        result["rankings"] = {name: ranking_metrics(np.nan_to_num(s, nan=0.0), positive) for name, s in rankings.items()}
    return result


def iba_variants(num_blocks: int) -> dict[str, IbaSettings]:
    """Every IBA setting the sweep compares: fusion x first block x relevance."""
    return {f"{fusion}/from{first}/{relevance}": IbaSettings(fusion=fusion, first_block=first, relevance=relevance)
            for fusion, first, relevance in itertools.product(("mean", "product", "max"), range(num_blocks),
                                                               ("head", "gradient"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default-vit")
    parser.add_argument("--images", type=int, default=96, help="synthetic val images")
    parser.add_argument("--seed", type=int, default=SYNTH_SEED, help="seed of the synthetic val split")
    parser.add_argument("--explainers", default=",".join(EXPLAINERS), help="comma-separated explainer names")
    parser.add_argument("--batch-size", type=int, default=16, help="images per explained batch")
    parser.add_argument("--steps", type=int, default=10, help="deletion / insertion steps")
    parser.add_argument("--forward-batch", type=int, default=128, help="perturbed images per forward (AUCs)")
    parser.add_argument("--sensitivity-images", type=int, default=32,
                        help="the first this many images are also explained for another class (class sensitivity)")
    parser.add_argument("--no-audit", action="store_true", help="skip the planted-cue recovery audit")
    parser.add_argument("--iba-sweep", action="store_true", help="compare IBA's settings (and legrad, cdam, "
                                                                 "rollout for reference) instead")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    adapter = ViTAdapter.load(args.model, device)
    started = time.perf_counter()
    if args.iba_sweep:
        chosen: dict[str, tuple[str, ExplainerSettings | None]] = {
            name: ("iba", settings) for name, settings in iba_variants(adapter.num_blocks).items()}
        chosen |= {name: (name, None) for name in ("legrad", "cdam", "rollout")}
    else:
        chosen = {name: (name, None) for name in args.explainers.split(",")}
    measured = [Measured(name, get_explainer(kind, settings)) for name, (kind, settings) in chosen.items()]
    with tempfile.TemporaryDirectory() as tmp:
        split = make_split(Path(tmp), args.images, args.seed, adapter)
        per_forward = measure(adapter, split, measured, args)
        result: dict[str, Any] = {"explainers": {m.name: m.summary(per_forward) for m in measured}}
        if not (args.no_audit or args.iba_sweep):
            result["cue_recovery"] = cue_recovery(adapter, split, Path(tmp), args)
    result["setup"] = {"model": args.model, "images": args.images, "seed": args.seed, "steps": args.steps,
                       "bare_forward_s_per_image": float(f"{per_forward:.4g}"), "device": str(device),
                       "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
