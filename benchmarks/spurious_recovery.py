"""The planted-cue benchmark suite: does the audit rank the predictions that depend on a cue above the others,
on planted-cue worlds it was not tuned on?

Each generator of `pipeline.sources.synthetic.GENERATORS` is a planted-cue world (object shapes, cue kind, cue
rate). For each: a fresh val split (with lone-cue images and cued-class objects drawn without their cue) is
audited by that world's model (the shipped model for `compact-patch`; for the others a detector fine-tuned
from it by `eive-audit train` on the world's own train split, `TRAIN_RECIPE`, trained on first use and kept
under `--models`). Ground truth the audit never sees: every instance of an image with a cue is re-scored on
the generator's counterfactual (the same image re-rendered without its cues, identical elsewhere); an instance
is positive when its score falls to half or less. Instances of images without cues are negatives.

Rankings: ours (`spurious_score`), random, 1 - confidence, FiftyOne Brain's mistakenness and the normalised
off-object share (1 - the resolution-aware mass on the object). Also per class: the flag rate of correct
detections without reliance, by the normalised rule the audit uses and by the raw rule it replaced (raw
share >= the same threshold).

    python benchmarks/spurious_recovery.py --quick                    # compact-patch, 120 images, ~1 minute
    python benchmarks/spurious_recovery.py --suite --models M         # every generator: the README's figures
    python benchmarks/spurious_recovery.py --suite --models M --fit   # refit pipeline/findings/ranking.py

`--fit` audits with a budget that verifies and localises every instance, then fits the two logistic models
of `pipeline.findings.ranking` leave-one-generator-out (each generator scored by the models fitted on the
others: held-out figures) and on all generators (the coefficients to ship), and prints both as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torchvision.ops import box_convert

from eive_audit.pipeline.models.targets import instance_scores
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.sources.decode import decode_rgb
from eive_audit.pipeline.sources.synthetic import generate, render_counterfactual

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


def top_cue_on_cue(store: Path, run_id: str, ann: Path, explainer: str = "eive") -> dict[str, Any]:
    """Where the cued class's largest candidate cue sits: the share of its exemplars, and of all its
    members, whose peak window centre lies within half a grid cell of a planted cue box of the same image."""
    from eive_audit.storage.catalog import query

    raw = json.loads(ann.read_text())
    cue = query(store, "SELECT cue_id, support, verification_drop, exemplar_ids FROM findings WHERE run_id = ? "
                       "AND label_name = ? AND explainer = ? ORDER BY support DESC, cue_id LIMIT 1",
                [run_id, raw["synthetic"]["cued_category"], explainer]).to_pylist()
    if not cue:
        return {"cue_id": None}
    members = query(store, "SELECT instance_id, image_id, peak_x, peak_y FROM instances WHERE run_id = ? AND cue_id = ?",
                    [run_id, cue[0]["cue_id"]]).to_pylist()
    boxes: dict[int, list[list[float]]] = {}
    for c in raw["cues"]:
        boxes.setdefault(c["image_id"], []).append(c["bbox"])
    half = 4.0  # half a grid cell of the shipped model (stride 8) in pixels of the 128-px images

    def on_cue(row: dict[str, Any]) -> bool:
        return any(x - half < row["peak_x"] < x + w + half and y - half < row["peak_y"] < y + h + half
                   for x, y, w, h in boxes.get(row["image_id"], []))

    exemplars = set(cue[0]["exemplar_ids"])
    return {"cue_id": cue[0]["cue_id"], "support": cue[0]["support"], "verification_drop": cue[0]["verification_drop"],
            "exemplars_on_cue": round(float(np.mean([on_cue(r) for r in members if r["instance_id"] in exemplars])), 4),
            "members_on_cue": round(float(np.mean([on_cue(r) for r in members])), 4)}


# How each world's model is made: fine-tuned from the shipped model on 2000 train images of the world
# (seed 11), relabelled to its categories. About 8 minutes a model on 2 CPU cores.
TRAIN_RECIPE = {"n_train": 2000, "seed": 11, "steps": 1200, "batch_size": 16, "lr": 3e-4, "warmup_steps": 100}
SHIPPED_WORLD = "compact-patch"  # the world the shipped model was trained on
FULL_BUDGET = {"forward_budget": 1000.0}  # verifies and localises every instance


def world_model(generator: str, models: Path | None) -> str:
    """The model of a world: the shipped one for its own world, else `models/<generator>`, trained there by
    `eive-audit train` (`TRAIN_RECIPE`) when missing."""
    if generator == SHIPPED_WORLD:
        return "default"
    if models is None:
        raise SystemExit(f"the {generator} world needs --models DIR (its model is trained there on first use)")
    out = models / generator
    if not (out / "model.safetensors").is_file():
        data = models / f"{generator}-train"
        r = TRAIN_RECIPE
        eive = [sys.executable, "-m", "eive_audit"]
        subprocess.run([*eive, "synth", "--out", str(data), "--generator", generator, "--n-train", str(r["n_train"]),
                        "--n-val", "0", "--seed", str(r["seed"])], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*eive, "train", "--coco", str(data / "annotations" / "train.json"),
                        "--images", str(data / "images" / "train"), "--out", str(out), "--init", "default",
                        "--steps", str(r["steps"]), "--batch-size", str(r["batch_size"]), "--lr", str(r["lr"]),
                        "--warmup-steps", str(r["warmup_steps"]), "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
    return str(out)


def audit_world(generator: str, model: str, n_val: int, seed: int, work: Path,
                findings: dict[str, Any] | None = None, explainer: str = "eive") -> dict[str, Any]:
    """Audit a fresh val split of one world with `explainer`; returns its instances rows with their ground
    truth (`cf_ratio`, `positive`), the run summary and the paths."""
    from eive_audit.flows.audit import audit
    from eive_audit.pipeline.config import AuditConfig
    from eive_audit.pipeline.sources.synthetic import GENERATORS
    from eive_audit.storage.catalog import query

    ann = generate(work / "data", 0, n_val, seed, GENERATORS[generator])["val"]
    images = work / "data" / "images" / "val"
    config = AuditConfig(images=images, coco=ann, out=work / "store", model=model, review={"report": False},
                         findings=findings or {}, explainers={explainer: {}})
    started = time.perf_counter()
    summary = audit(config)
    seconds = time.perf_counter() - started
    rows = query(work / "store", "SELECT * FROM instances WHERE run_id = ? AND explainer = ? ORDER BY instance_id",
                 [summary["run_id"], explainer]).to_pylist()
    ratios = counterfactual_ratios(DetrAdapter.load(model), rows, ann, images)
    for row in rows:
        row["cf_ratio"] = ratios[row["instance_id"]]
        row["positive"] = ratios[row["instance_id"]] <= 0.5
    timing = query(work / "store", "SELECT sum(forward_ms) / 1000 AS forward_s FROM images WHERE run_id = ?",
                   [summary["run_id"]]).to_pylist()[0]
    (work / "rows.json").write_text(json.dumps(rows, default=str))  # every instance with its ground truth, to study
    return {"rows": rows, "summary": summary, "ann": ann, "images": images, "seconds": seconds,
            "forward_s": timing["forward_s"], "threshold": config.score_threshold, "config": config,
            "explainer": explainer}


def flag_rates(world: dict[str, Any], reaches: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    """Per class, the share of correct detections without reliance that are flagged off-object, by the raw
    share (the rule the normalised one replaced) and by the normalised share at each reach (the audit's rule at
    its `reach_cells`), recomputed from the stored maps; and the same share among correct detections that do
    rely on the cue (a flag should still catch some of those)."""
    from eive_audit.pipeline.config import FindingsConfig
    from eive_audit.pipeline.findings.flags import flag_map, object_region, row_box
    from eive_audit.pipeline.geometry import Geometry
    from eive_audit.storage.catalog import query
    from eive_audit.storage.maps import decode_map

    store, run_id = world["config"].out, world["summary"]["run_id"]
    maps = {m["instance_id"]: decode_map(m["map"], m["grid_h"], m["grid_w"]) for m in query(
        store, "SELECT instance_id, grid_h, grid_w, \"map\" FROM maps WHERE run_id = ? AND explainer = ?",
        [run_id, world["explainer"]]).to_pylist()}
    images = {r["image_id"]: r for r in query(store, "SELECT * FROM images WHERE run_id = ?", [run_id]).to_pylist()}
    default = FindingsConfig()
    tps = [row for row in world["rows"] if row["outcome"] == "tp"]
    flagged: dict[str, list[bool]] = {"raw": [row["off_object_share"] >= default.off_object for row in tps]}
    for reach in reaches:
        config = FindingsConfig(reach_cells=reach)
        marks = []
        for row in tps:
            saliency = torch.from_numpy(np.asarray(maps[row["instance_id"]], dtype=np.float32))
            geometry = Geometry.from_image_row(images[row["image_id"]], tuple(saliency.shape))
            cells = object_region(row, torch.tensor([row_box(row, "gt")], dtype=torch.float32), geometry)
            marks.append(flag_map("tp", saliency, cells, config).flag_off_object)
        flagged[f"reach {reach}"] = marks
    rates: dict[str, Any] = {}
    for name in sorted({row["label_name"] for row in tps}):
        for group, wanted in (("clean", False), ("reliant", True)):
            chosen = [i for i, row in enumerate(tps) if row["label_name"] == name and row["positive"] == wanted]
            if chosen:
                rates.setdefault(name, {})[group] = {"n": len(chosen), **{
                    rule: round(float(np.mean([marks[i] for i in chosen])), 4) for rule, marks in flagged.items()}}
    return rates


def world_metrics(world: dict[str, Any], seed: int) -> dict[str, Any]:
    """Rankings, positives and flag rates of one audited world."""
    rows = world["rows"]
    positive = np.array([row["positive"] for row in rows])
    rng = np.random.default_rng(seed)
    rankings = {
        "ours": np.array([row["spurious_score"] for row in rows], dtype=float),
        "random": rng.random(len(rows)),
        "1-confidence": np.array([1 - row["score"] for row in rows]),
        "off-object (normalised)": np.array([row["off_object_norm"] for row in rows], dtype=float),
    }
    mistaken = mistakenness(rows, world["ann"], world["images"])
    rankings["mistakenness"] = np.array([mistaken[row["instance_id"]] for row in rows])
    by_outcome: dict[str, int] = {}
    for row in rows:
        if row["positive"]:
            by_outcome[row["outcome"]] = by_outcome.get(row["outcome"], 0) + 1
    summary = world["summary"]
    result: dict[str, Any] = {
        "n_instances": len(rows), "n_positive": int(positive.sum()), "positives_by_outcome": by_outcome,
        "flag_rates": flag_rates(world),
        "verified": summary["verified"], "localised": summary["localised"],
        "audit_seconds": round(world["seconds"], 1), "shards_seconds": summary.get("shards_seconds"),
        "findings_seconds": summary.get("findings_seconds"),
        "findings_over_shards": round(summary["findings_seconds"] / max(summary["shards_seconds"], 1e-6), 2)
        if summary.get("findings_seconds") is not None and summary.get("shards_seconds") else None}
    if 0 < positive.sum() < len(rows):
        result["rankings"] = {name: ranking_metrics(scores, positive) for name, scores in rankings.items()}
    result["top_cue"] = top_cue_on_cue(world["config"].out, summary["run_id"], world["ann"], world["explainer"])
    return result


def _finding(row: dict[str, Any], verified: bool = True, localised: bool = True) -> Any:
    """The finding of a stored row, as the ranking reads it; without verification (or localisation) when the
    default budget would not have reached it."""
    from eive_audit.pipeline.findings.flags import InstanceFinding

    return InstanceFinding(row["off_object_share"], row["off_object_norm"], row["flag_off_object"],
                           row["flag_background_fp"], row["flag_miss_elsewhere"],
                           verification_drop=row["verification_drop"] if verified else None,
                           specificity=row["specificity"] if verified and localised else None)


def default_budget_view(world: dict[str, Any], prior: Any) -> tuple[set[int], set[int]]:
    """Which of a world's instances (row positions) the default forward budget verifies and localises, from a
    run that verified and localised everything: verification takes one forward per image, the images of the
    instances `prior` ranks first, and localisation the largest confirmed drops while each case's cost as the
    budget counts it (`localisation_cost`: its tiles plus one tile's windows, 16 + 9 on the 16 x 16 grid of
    these worlds' models) fits in the rest."""
    from eive_audit.pipeline.config import FindingsConfig
    from eive_audit.pipeline.findings.ranking import features

    config, rows = FindingsConfig(), world["rows"]
    budget = round(config.forward_budget * world["summary"]["audited"])
    suspicion: dict[int, float] = {}
    for r in rows:
        p = prior(features(r, _finding(r, False), world["threshold"]))
        suspicion[r["image_id"]] = max(suspicion.get(r["image_id"], 0.0), p)
    images = set(sorted(suspicion, key=lambda i: (-suspicion[i], i))[:budget])
    chosen = {i for i, r in enumerate(rows) if r["image_id"] in images}
    confirmed = sorted((i for i in chosen if rows[i]["verification_drop"] >= config.confirm_drop),
                       key=lambda i: -rows[i]["verification_drop"])
    return chosen, set(confirmed[:max(budget - len(images), 0) // 25])


def fit_rankings(worlds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Fit `ranking.PRIOR` (on every instance, before verification) and `ranking.FULL` (on the instances the
    default budget verifies, localised where it would localise them) on all worlds: the coefficients to ship;
    and score each world at the default budget by the models fitted on the others (leave-one-generator-out: the
    held-out figures). `worlds` were audited with a budget that verified and localised every instance."""
    from sklearn.linear_model import LogisticRegression

    from eive_audit.pipeline.findings.ranking import FULL_FEATURES, PRIOR_FEATURES, Logistic, features

    def design(g: str, names: tuple[str, ...], view: tuple[set[int], set[int]] | None) -> tuple[np.ndarray, np.ndarray]:
        rows, threshold = worlds[g]["rows"], worlds[g]["threshold"]
        chosen = range(len(rows)) if view is None else sorted(view[0])
        x = [[features(rows[i], _finding(rows[i], view is not None, view is not None and i in view[1]),
                       threshold)[n] for n in names] for i in chosen]
        return np.array(x, dtype=float), np.array([rows[i]["positive"] for i in chosen])

    def fit(names: tuple[str, ...], parts: list[str], views: dict[str, Any] | None) -> Logistic:
        xs, ys = zip(*(design(g, names, None if views is None else views[g]) for g in parts))
        model = LogisticRegression(C=1.0, max_iter=5000).fit(np.concatenate(xs), np.concatenate(ys))
        return Logistic({n: round(float(w), 3) for n, w in zip(names, model.coef_[0])}, round(float(model.intercept_[0]), 3))

    def fit_both(parts: list[str]) -> tuple[Logistic, Logistic]:
        prior = fit(PRIOR_FEATURES, parts, None)
        return prior, fit(FULL_FEATURES, parts, {g: default_budget_view(worlds[g], prior) for g in parts})

    held_out = {}
    for g, world in worlds.items():
        rows = world["rows"]
        positive = np.array([r["positive"] for r in rows])
        if not 0 < positive.sum() < len(positive):
            continue
        prior, full = fit_both([o for o in worlds if o != g])
        chosen, localised = default_budget_view(world, prior)
        threshold = world["threshold"]
        scores = np.array([full(features(r, _finding(r, True, i in localised), threshold)) if i in chosen
                           else prior(features(r, _finding(r, False), threshold)) for i, r in enumerate(rows)])
        confidence = np.array([1 - r["score"] for r in rows])
        held_out[g] = {"n_positive": int(positive.sum()), "ours": ranking_metrics(scores, positive),
                       "1-confidence": ranking_metrics(confidence, positive)}
    prior, full = fit_both(list(worlds))
    return {"prior": {"weights": dict(prior.weights), "bias": prior.bias},
            "full": {"weights": dict(full.weights), "bias": full.bias}, "held_out": held_out}


def run(model: str, n_val: int, seed: int, work: Path, findings: dict[str, Any] | None = None,
        explainer: str = "eive") -> dict[str, Any]:
    """The shipped world alone (the quick mode, the AAJTS and AHA comparisons): its metrics as one JSON object."""
    world = audit_world(SHIPPED_WORLD, model, n_val, seed, work, findings, explainer)
    return {**world_metrics(world, seed), "model": model, "n_val": n_val, "seed": seed,
            "seconds": round(world["seconds"], 1)}


def suite(generators: list[str], models: Path | None, n_val: int, seed: int, work: Path, fit: bool,
          findings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every world: its metrics, and the averages over the worlds where reliance exists; with `fit`, the
    refitted ranking instead (audited with a budget that covers every instance)."""
    from eive_audit.pipeline.config import FindingsConfig

    worlds, results = {}, {}
    for g in generators:
        settings = {**(findings or {}), **(FULL_BUDGET if fit else {})}
        worlds[g] = audit_world(g, world_model(g, models), n_val, seed, work / g, settings)
        if not fit:
            results[g] = world_metrics(worlds[g], seed)
            print(json.dumps({g: results[g]}), file=sys.stderr)
    if fit:
        return fit_rankings(worlds)
    reliant = [g for g, r in results.items() if "rankings" in r and r["n_positive"] >= 5]
    mean = {name: round(float(np.mean([results[g]["rankings"][name]["auroc"] for g in reliant])), 4)
            for name in ("ours", "1-confidence", "mistakenness", "off-object (normalised)", "random")} if reliant else {}
    reach = f"reach {FindingsConfig().reach_cells}"
    worst_flag_rate = {rule: max((rates["clean"][rule] for r in results.values() for rates in r["flag_rates"].values()
                                  if "clean" in rates), default=0.0) for rule in ("raw", reach)}
    return {"worlds": results, "with_reliance": reliant, "mean_auroc": mean, "worst_flag_rate": worst_flag_rate,
            "n_val": n_val, "seed": seed}


def main() -> None:
    from eive_audit.pipeline.sources.synthetic import GENERATORS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="the model of the single-world run")
    parser.add_argument("--n-val", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--quick", action="store_true", help="the shipped world, 120 images: a minute on CPU")
    parser.add_argument("--suite", action="store_true", help="every generator (or those of --generators)")
    parser.add_argument("--generators", default=",".join(GENERATORS), help="comma-separated, with --suite")
    parser.add_argument("--models", type=Path, default=None, help="where the worlds' models are kept and trained")
    parser.add_argument("--fit", action="store_true", help="with --suite: refit the ranking, print coefficients")
    parser.add_argument("--work", type=Path, default=None, help="keep data and stores here (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a findings setting to measure another value of (e.g. context_cells=4), repeatable")
    args = parser.parse_args()
    overrides = {key: json.loads(value) for key, _, value in (item.partition("=") for item in args.set)}
    n_val = 120 if args.quick else args.n_val
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(work / "fiftyone-db"))
        if args.suite:
            result = suite(args.generators.split(","), args.models, n_val, args.seed, work, args.fit, overrides)
        else:
            result = run(args.model, n_val, args.seed, work, overrides)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
