"""Findings: which predictions lean on something other than their object, and the shared cue behind them.

Run at the end of every audit, from the run's stored rows and maps (nothing here reads dataset-specific
annotations beyond the GT boxes of the instances table):

1. Per instance, the share of its map that lies off its object (`off_object_share`): off the matched GT
   box for a correct detection, duplicate or miss; off every GT box of the image for a false positive
   (its map sits on background); off its own box where there is no GT. Flags mark correct detections
   looking off-object, false positives driven by background and misses whose best query looked elsewhere.
2. Per class, each flagged instance's off-object saliency peak is described (the detector's own projected
   backbone feature at the peak, the peak's position relative to the box, the colour of the image there)
   and the descriptions are clustered (scikit-learn HDBSCAN). A cluster that many instances share is a
   candidate cue.
3. Verification, budgeted: the instance's surroundings (a ring around its box, plus its off-object peak)
   are blurred and the detection re-scored; the relative drop of its score is stored, and a large drop
   confirms reliance on something outside the object.
4. Localisation of confirmed reliance, budgeted: a window of 2 x 2 cells slides over those surroundings,
   each position blurred on its own; the window whose blur hurts most becomes the instance's peak; its
   drop, and how far it exceeds the median window's drop (`specificity`), are stored. Attention alone may
   miss a cue right beside the object (the backbone's receptive field folds it into the object's own
   tokens), so this is what puts the peak, and the clusters, on it.

`spurious_score` ranks instances for review: reliance on the surroundings times how specific to one place
it is (see `spurious_scores`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.cluster import HDBSCAN
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from torchvision.ops import box_convert
from torchvision.transforms.functional import gaussian_blur

from eive_audit.pipeline.config import FindingsConfig
from eive_audit.pipeline.metrics.faithfulness import instance_scores
from eive_audit.pipeline.metrics.localization import box_coverage, boxes_to_grid
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.models.preprocess import PixelBatch, load_image

OBJECT_OUTCOMES = ("tp", "dup", "fn")


@dataclass
class InstanceFinding:
    """Per (instance, explainer): what findings add to its row."""

    off_object_share: float
    flag_off_object: bool
    flag_background_fp: bool
    flag_miss_elsewhere: bool
    peak: tuple[int, int] | None = None  # grid cell (row, col) of the off-object peak (top-left of its window)
    peak_xy: tuple[float, float] | None = None  # the peak window's centre in original pixels
    peak_span: int = 1  # side of the peak window in cells: 1 for an attention peak, more once localised
    cue_id: str | None = None
    verification_drop: float | None = None
    localised_drop: float | None = None
    specificity: float | None = None  # localised drop minus the median drop over all windows
    spurious_score: float = 0.0

    @property
    def flagged(self) -> bool:
        return self.flag_off_object or self.flag_background_fp or self.flag_miss_elsewhere


@dataclass
class Findings:
    """The result: per-instance updates keyed by (instance_id, explainer), and one row per candidate cue."""

    instances: dict[tuple[str, str], InstanceFinding] = field(default_factory=dict)
    cues: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Geometry:
    """How an image's grid maps onto its original pixels (the stored input and padded sizes)."""

    original: tuple[int, int]
    input: tuple[int, int]
    padded: tuple[int, int]
    grid: tuple[int, int]

    def to_grid(self, boxes: torch.Tensor) -> torch.Tensor:
        return boxes_to_grid(boxes, self.original, self.input, self.padded, self.grid)

    def cell_in_original(self, row: int, col: int, radius: int = 0, span: int = 1) -> tuple[int, int, int, int]:
        """Pixel rectangle (x0, y0, x1, y1) of the original image under the `span` x `span` cells from
        (row, col) and `radius` cells around them."""
        (oh, ow), (ih, iw), (ph, pw), (gh, gw) = self.original, self.input, self.padded, self.grid
        sx, sy = (pw / gw) * (ow / iw), (ph / gh) * (oh / ih)
        x0, x1 = max(0, int((col - radius) * sx)), min(ow, int(np.ceil((col + span + radius) * sx)))
        y0, y1 = max(0, int((row - radius) * sy)), min(oh, int(np.ceil((row + span + radius) * sy)))
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _box(row: dict[str, Any], prefix: str) -> list[float] | None:
    values = [row[f"{prefix}_{c}"] for c in ("x0", "y0", "x1", "y1")]
    return None if values[0] is None else values


def _instance_box(row: dict[str, Any]) -> list[float]:
    """The box an instance is about: its GT box for tp / dup / fn, else its predicted box."""
    gt = _box(row, "gt")
    return gt if row["outcome"] in OBJECT_OUTCOMES and gt is not None else _box(row, "pred")  # type: ignore[return-value]


def _object_region(row: dict[str, Any], gt_boxes: torch.Tensor, geometry: _Geometry) -> torch.Tensor:
    """Cells [h, w] (coverage in [0, 1]) that count as the instance's object."""
    if row["outcome"] == "fp" and len(gt_boxes):
        boxes = gt_boxes  # a false positive has no object: anything on a real object is not background
    else:
        boxes = torch.tensor([_instance_box(row)])
    return box_coverage(geometry.to_grid(boxes.float()), geometry.grid).amax(0)


def describe_instance(row: dict[str, Any], saliency: np.ndarray, gt_boxes: torch.Tensor, geometry: _Geometry,
                      config: FindingsConfig) -> InstanceFinding:
    """Off-object share, flags and peak cell of one instance's map."""
    m = torch.from_numpy(np.asarray(saliency, dtype=np.float32))
    off = m * (1 - _object_region(row, gt_boxes, geometry))
    total = float(m.sum())
    share = float(off.sum()) / total if total > 0 else 0.0
    outcome = row["outcome"]
    finding = InstanceFinding(
        off_object_share=share,
        flag_off_object=outcome in ("tp", "dup") and share >= config.off_object,
        flag_background_fp=outcome == "fp" and share >= config.background,
        flag_miss_elsewhere=outcome == "fn" and share >= config.off_object,
    )
    if float(off.max()) > 0:
        r, c = (int(v) for v in np.unravel_index(int(off.argmax()), off.shape))
        x0, y0, x1, y1 = geometry.cell_in_original(r, c)
        finding.peak, finding.peak_xy = (r, c), ((x0 + x1) / 2, (y0 + y1) / 2)
    return finding


def _region_in_original(cells: torch.Tensor, geometry: _Geometry) -> torch.Tensor:
    """A boolean cell mask [h, w] of the stored grid as a pixel mask [H, W] of the original image."""
    (oh, ow), (ih, iw), (ph, pw), (gh, gw) = geometry.original, geometry.input, geometry.padded, geometry.grid
    valid_h, valid_w = gh * ih / ph, gw * iw / pw  # grid extent of the image itself (the rest is padding)
    ys = ((torch.arange(oh) + 0.5) / oh * valid_h).long().clamp(max=gh - 1)
    xs = ((torch.arange(ow) + 0.5) / ow * valid_w).long().clamp(max=gw - 1)
    return cells[ys][:, xs]


def _candidate_region(case: "_Case", context_cells: int) -> torch.Tensor:
    """Cells [h, w] to blur when verifying an instance: its off-object peak cell and the 8 around it, and
    the ring of `context_cells` cells around its box; never its object. The ring is there because a cue
    right beside an object can reach the object's own tokens through the backbone's receptive field, so
    the map need not leave the object for the detection to depend on its surroundings."""
    own = box_coverage(case.geometry.to_grid(torch.tensor([case.box], dtype=torch.float32)), case.geometry.grid)[0]
    kernel = 2 * context_cells + 1
    ring = F.max_pool2d((own > 0).float()[None, None], kernel, stride=1, padding=context_cells)[0, 0].bool()
    region = ring & (own < 0.5)
    if case.finding.peak is not None:
        r, c = case.finding.peak
        region[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = True
    return region & (case.object_cells < 0.5)


def _descriptor(image: torch.Tensor, features: torch.Tensor, valid: tuple[float, float], case: "_Case") -> np.ndarray:
    """The off-object peak of one instance as a vector: the projected backbone feature at the peak (unit
    norm; `features` [D, h, w] from a batch in which the image fills the `valid` fraction of the padded
    input), the peak's position relative to the instance box (in box widths / heights from its centre),
    and the colour mean and std of the image under the peak cell (in [0, 1])."""
    r, c = case.finding.peak  # type: ignore[misc]
    x0, y0, x1, y1 = case.geometry.cell_in_original(r, c, span=case.finding.peak_span)
    fh, fw = features.shape[-2:]
    oh, ow = case.geometry.original
    fy = min(int((y0 + y1) / 2 / oh * valid[0] * fh), fh - 1)
    fx = min(int((x0 + x1) / 2 / ow * valid[1] * fw), fw - 1)
    feature = features[:, fy, fx].float()
    feature = (feature / feature.norm().clamp(min=1e-6)).cpu().numpy()
    bx0, by0, bx1, by1 = case.box
    position = [((x0 + x1) / 2 - (bx0 + bx1) / 2) / max(bx1 - bx0, 1.0),
                ((y0 + y1) / 2 - (by0 + by1) / 2) / max(by1 - by0, 1.0)]
    patch = image[:, y0:y1, x0:x1].float().flatten(1) / 255
    colour = torch.cat([patch.mean(1), patch.std(1, correction=0)]).numpy()
    return np.concatenate([feature, position, colour]).astype(np.float32)


def _crop(image: torch.Tensor, case: "_Case", scale: int = 4) -> bytes:
    """PNG bytes of the image around an instance's peak window and one cell around it, enlarged for viewing."""
    r, c = case.finding.peak  # type: ignore[misc]
    x0, y0, x1, y1 = case.geometry.cell_in_original(r, c, radius=1, span=case.finding.peak_span)
    patch = Image.fromarray(image[:, y0:y1, x0:x1].permute(1, 2, 0).cpu().numpy())
    patch = patch.resize((patch.width * scale, patch.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    patch.save(buffer, format="PNG")
    return buffer.getvalue()


def cluster_peaks(descriptors: np.ndarray, config: FindingsConfig) -> np.ndarray:
    """Cluster labels (-1 for noise) of peak descriptors [n, D + 8]: the feature part is reduced by PCA,
    then every column standardised, so feature, position and colour weigh alike; HDBSCAN needs no cluster
    count and leaves one-off peaks unclustered."""
    if len(descriptors) < config.min_support:
        return np.full(len(descriptors), -1)
    features, rest = descriptors[:, :-8], descriptors[:, -8:]
    dims = min(config.feature_dims, features.shape[1], len(descriptors) - 1)
    reduced = PCA(n_components=dims, random_state=0).fit_transform(features) if dims > 0 else features[:, :0]
    x = StandardScaler().fit_transform(np.concatenate([reduced, rest], axis=1))
    labels = HDBSCAN(min_cluster_size=config.min_support, min_samples=config.min_support, copy=True).fit_predict(x)
    if labels.max() < 0:
        # By default HDBSCAN never returns the whole tree as one cluster, so a class whose peaks hold a single
        # dense group among scattered ones (one cue, a small run) would get none. Asking for the single cluster
        # only when nothing else came back keeps two distinct groups apart; sklearn then labels the group's
        # densest core, which verification confirms or not like any cluster.
        labels = HDBSCAN(min_cluster_size=config.min_support, min_samples=config.min_support, copy=True,
                         allow_single_cluster=True).fit_predict(x)
    return labels


def spurious_scores(findings: Iterable[InstanceFinding]) -> None:
    """Fill `spurious_score` in [0, 1]: the verified drop with the surroundings blurred times the specificity
    of that reliance. A shortcut is one place: blurring the window on it costs the score, blurring the
    others does not. A detection that is merely fragile loses its score wherever one blurs (a high median
    window drop), and one that uses its context as a whole loses it only to the full ring; neither is a
    shortcut. Where a case was not localised, its off-object share stands in for the specificity (attention
    leaving the object hints at one place), and where it was not verified either, for the drop too."""
    for f in findings:
        drop = f.off_object_share if f.verification_drop is None else min(max(f.verification_drop, 0.0), 1.0)
        specific = f.off_object_share if f.specificity is None else min(max(f.specificity, 0.0), 1.0)
        f.spurious_score = drop * specific


@dataclass
class _Case:
    """One (instance, explainer) under study: its row, finding, geometry, object cells and model label."""

    row: dict[str, Any]
    finding: InstanceFinding
    geometry: _Geometry
    object_cells: torch.Tensor
    label: int
    descriptor: np.ndarray | None = None
    crop: bytes | None = None

    @property
    def box(self) -> list[float]:
        return _instance_box(self.row)

    @property
    def explained_box(self) -> list[float]:
        """The box its detection score is measured on: the GT box for a miss, else the prediction."""
        return _box(self.row, "gt" if self.row["outcome"] == "fn" else "pred")  # type: ignore[return-value]


def _geometry(image_row: dict[str, Any], grid: tuple[int, int]) -> _Geometry:
    return _Geometry((image_row["height"], image_row["width"]), (image_row["input_height"], image_row["input_width"]),
                     (image_row["padded_height"], image_row["padded_width"]), grid)


def find_spurious(adapter: DetrAdapter, rows: list[dict[str, Any]], maps: dict[tuple[str, str], np.ndarray],
                  images: dict[int, dict[str, Any]], model_labels: dict[tuple[str, str], int],
                  config: FindingsConfig, batch_size: int) -> Findings:
    """Findings of one run: rows of its instances table, their maps by (instance_id, explainer), its images
    rows by image id (file_path and the stored sizes) and the model label index of each instance; forwards
    take `batch_size` images (the audit's)."""
    gt_boxes: dict[int, set[tuple[float, ...]]] = {}
    for row in rows:
        if _box(row, "gt") is not None:
            gt_boxes.setdefault(row["image_id"], set()).add(tuple(_box(row, "gt")))  # type: ignore[arg-type]
    cases: dict[tuple[str, str], _Case] = {}
    for row in rows:
        key = (row["instance_id"], row["explainer"])
        saliency = maps[key]
        geometry = _geometry(images[row["image_id"]], saliency.shape)
        boxes = torch.tensor(sorted(gt_boxes.get(row["image_id"], ())), dtype=torch.float32).reshape(-1, 4)
        cases[key] = _Case(row, describe_instance(row, saliency, boxes, geometry, config), geometry,
                           _object_region(row, boxes, geometry), model_labels[key])
    order = sorted(cases, key=lambda k: (not cases[k].finding.flagged, -cases[k].finding.off_object_share, k))
    _verify(adapter, [cases[k] for k in order[:config.verify_budget]], images, config, batch_size)
    confirmed = sorted((k for k in order[:config.verify_budget]
                        if cases[k].finding.verification_drop >= config.confirm_drop),  # type: ignore[operator]
                       key=lambda k: (-cases[k].finding.verification_drop, k))  # type: ignore[operator]
    _localise(adapter, _within_budget([cases[k] for k in confirmed], config), images, config, batch_size)
    described = [case for case in cases.values()
                 if case.finding.peak is not None and (case.finding.flagged or case.finding.localised_drop is not None)]
    _describe(adapter, described, images, batch_size)
    findings = Findings(instances={key: case.finding for key, case in cases.items()})
    findings.cues = _cluster(described, config)
    spurious_scores(findings.instances.values())
    for cue in findings.cues:
        members = [case.finding for case in cue.pop("_members")]
        drops = [m.verification_drop for m in members if m.verification_drop is not None]
        cue["mean_spurious_score"] = float(np.mean([m.spurious_score for m in members]))
        cue["verified"] = len(drops)
        cue["verification_drop"] = float(np.mean(drops)) if drops else None
        cue["confirmed"] = bool(drops) and float(np.mean(drops)) >= config.confirm_drop
    return findings


def _image_batches(adapter: DetrAdapter, cases: list[_Case], images: dict[int, dict[str, Any]],
                   batch_size: int) -> Iterator[tuple[PixelBatch, list[torch.Tensor], list[list[_Case]]]]:
    """The images the cases belong to, `batch_size` per batch: the preprocessed batch, the decoded pictures,
    and each picture's cases. The batch need not pad like the audit's did, so regions travel between the
    two geometries through the original pixels."""
    by_image: dict[int, list[_Case]] = {}
    for case in cases:
        by_image.setdefault(case.row["image_id"], []).append(case)
    ids = sorted(by_image)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        pictures = [load_image(images[i]["file_path"]) for i in chunk]
        with torch.inference_mode():
            batch = adapter.preprocess(pictures)
        yield batch, pictures, [by_image[i] for i in chunk]


def _verify(adapter: DetrAdapter, cases: list[_Case], images: dict[int, dict[str, Any]], config: FindingsConfig,
            batch_size: int) -> None:
    """Fill each case's `verification_drop`: its surroundings (`_candidate_region`) blurred at once."""
    for batch, _, per_image in _image_batches(adapter, cases, images, batch_size):
        jobs = [(b, case, _candidate_region(case, config.context_cells))
                for b, mine in enumerate(per_image) for case in mine]
        for (_, case, _), drop in zip(jobs, _rescore(adapter, batch, jobs, config.blur_sigma, batch_size)):
            case.finding.verification_drop = drop


def _windows(case: _Case, config: FindingsConfig) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """Every distinct `window_cells`-wide window of a case's surroundings: (top-left cell, cells [h, w])."""
    region = _candidate_region(case, config.context_cells)
    gh, gw = region.shape
    k = config.window_cells
    found: dict[bytes, tuple[tuple[int, int], torch.Tensor]] = {}
    for r, c in region.nonzero().tolist():
        for top, left in ((r - dr, c - dc) for dr in range(k) for dc in range(k)):
            if 0 <= top <= gh - k and 0 <= left <= gw - k:
                window = torch.zeros_like(region)
                window[top:top + k, left:left + k] = True
                window &= region
                found.setdefault(window.numpy().tobytes(), ((top, left), window))
    return sorted(found.values(), key=lambda item: item[0])


def _within_budget(cases: list[_Case], config: FindingsConfig) -> list[_Case]:
    """The leading cases whose windows (one forward each) fit in the localisation budget: a forward costs
    seconds for a real-size detector on a CPU, so the budget counts forwards, not instances."""
    chosen, spent = [], 0
    for case in cases:
        spent += len(_windows(case, config))
        if spent > config.localise_budget:
            break
        chosen.append(case)
    return chosen


def _localise(adapter: DetrAdapter, cases: list[_Case], images: dict[int, dict[str, Any]], config: FindingsConfig,
              batch_size: int) -> None:
    """Blur each window of each case's surroundings on its own: the window that costs the most score becomes
    the case's peak (ties: the first in row-major order), its drop the `localised_drop`, and that drop minus
    the median window's drop the `specificity`."""
    for batch, _, per_image in _image_batches(adapter, cases, images, batch_size):
        jobs, corners = [], []
        for b, mine in enumerate(per_image):
            for case in mine:
                for corner, window in _windows(case, config):
                    jobs.append((b, case, window))
                    corners.append(corner)
        drops: dict[int, list[tuple[float, tuple[int, int]]]] = {}
        for (_, case, _), corner, drop in zip(jobs, corners, _rescore(adapter, batch, jobs, config.blur_sigma, batch_size)):
            drops.setdefault(id(case), []).append((drop, corner))
        for case in (case for mine in per_image for case in mine if id(case) in drops):
            values = [drop for drop, _ in drops[id(case)]]
            best = int(np.argmax(values))
            r, c = drops[id(case)][best][1]
            x0, y0, x1, y1 = case.geometry.cell_in_original(r, c, span=config.window_cells)
            finding = case.finding
            finding.localised_drop, finding.specificity = values[best], values[best] - float(np.median(values))
            finding.peak, finding.peak_span, finding.peak_xy = (r, c), config.window_cells, ((x0 + x1) / 2, (y0 + y1) / 2)


def _describe(adapter: DetrAdapter, cases: list[_Case], images: dict[int, dict[str, Any]], batch_size: int) -> None:
    """Fill each case's peak descriptor (feature, position, colour) and crop."""
    for batch, pictures, per_image in _image_batches(adapter, cases, images, batch_size):
        with torch.inference_mode():
            features = adapter.record(batch, gradients=False).features
        padded = batch.pixel_values.shape[-2:]
        for b, (picture, mine) in enumerate(zip(pictures, per_image)):
            ih, iw = (int(v) for v in batch.input_sizes[b])
            for case in mine:
                case.descriptor = _descriptor(picture, features[b], (ih / padded[0], iw / padded[1]), case)
                case.crop = _crop(picture, case)


def _rescore(adapter: DetrAdapter, batch: PixelBatch, jobs: list[tuple[int, _Case, torch.Tensor]],
             blur_sigma: float, batch_size: int) -> list[float]:
    """Relative score drop of each (batch image, case, cells [h, w]) when those cells are filled with their
    surroundings blurred, the object itself left out of the blur (normalised convolution) so that no
    object colour bleeds into the region and reshapes the object's outline."""
    if not jobs:
        return []
    pixels, mask = batch.pixel_values, batch.pixel_mask
    fills = _fills(batch, jobs, blur_sigma)
    drops: list[float] = []
    with torch.inference_mode():
        probs, out_boxes = adapter.predict(pixels, mask)
        for part in range(0, len(jobs), batch_size):  # masks at input size exist one part at a time
            chunk = jobs[part:part + batch_size]
            index = torch.tensor([b for b, _, _ in chunk], device=pixels.device)
            region = torch.stack([_blurred_region(batch, b, case, cells) for b, case, cells in chunk]).to(pixels.device)
            box, labels = _targets(chunk, pixels.device)
            intact = instance_scores(probs[index], out_boxes[index], labels, box)
            fill = torch.stack([fills[id(case)] for _, case, _ in chunk])
            perturbed = adapter.predict(torch.where(region[:, None], fill, pixels[index]), mask[index])
            drops += (1 - instance_scores(*perturbed, labels, box) / intact.clamp(min=1e-6)).tolist()
    return drops


def _box_mask(case: _Case) -> torch.Tensor:
    """The case's box as a boolean mask of the original image."""
    inside = torch.zeros(case.geometry.original, dtype=torch.bool)
    x0, y0, x1, y1 = (int(round(v)) for v in case.box)
    inside[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    return inside


def _to_input(mask: torch.Tensor, batch: PixelBatch, b: int) -> torch.Tensor:
    """A boolean mask of image `b`'s original pixels, resized to its input size and padded like the batch."""
    ih, iw = (int(v) for v in batch.input_sizes[b])
    pad = (0, batch.pixel_values.shape[-1] - iw, 0, batch.pixel_values.shape[-2] - ih)
    return F.pad(F.interpolate(mask[None, None].float(), size=(ih, iw), mode="nearest")[0, 0], pad).bool()


def _blurred_region(batch: PixelBatch, b: int, case: _Case, cells: torch.Tensor) -> torch.Tensor:
    """The cells to blur as an input mask, the case's box left out (cells are coarse: spare the object)."""
    region = _region_in_original(cells, case.geometry)
    return _to_input(region & ~_box_mask(case), batch, b)


def _targets(jobs: list[tuple[int, _Case, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised cxcywh boxes and model labels that each job's detection is scored on."""
    boxes = []
    for _, case, _ in jobs:
        oh, ow = case.geometry.original
        boxes.append(torch.tensor(case.explained_box) / torch.tensor([ow, oh, ow, oh], dtype=torch.float32))
    labels = torch.tensor([case.label for _, case, _ in jobs], device=device)
    return box_convert(torch.stack(boxes), "xyxy", "cxcywh").to(device), labels


def _fills(batch: PixelBatch, jobs: list[tuple[int, _Case, torch.Tensor]], sigma: float) -> dict[int, torch.Tensor]:
    """Per case (by id), its image blurred with its object left out (normalised convolution): computed once,
    since every window of a case shares it (the blur costs more than the small model's forward)."""
    kernel = int(2 * round(3 * sigma) + 1)
    fills: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for b, case, cells in jobs:
            if id(case) in fills:
                continue
            inside = _to_input(_box_mask(case), batch, b).to(batch.pixel_values.device)
            kept = (~inside & batch.pixel_mask[b].bool())[None, None].float()
            source = batch.pixel_values[b:b + 1] * kept
            fills[id(case)] = (gaussian_blur(source, [kernel, kernel], [sigma, sigma])
                               / gaussian_blur(kept, [kernel, kernel], [sigma, sigma]).clamp(min=1e-6))[0]
    return fills


def _cluster(cases: list[_Case], config: FindingsConfig) -> list[dict[str, Any]]:
    """Cluster the flagged peaks per (explainer, class); each cluster is a candidate cue (largest first)."""
    groups: dict[tuple[str, str], list[_Case]] = {}
    for case in cases:
        groups.setdefault((case.row["explainer"], case.row["label_name"]), []).append(case)
    cues = []
    for (explainer, label), members_of_class in sorted(groups.items()):
        labels = cluster_peaks(np.stack([c.descriptor for c in members_of_class]), config)
        clusters = sorted({int(l) for l in labels if l >= 0}, key=lambda l: (-int((labels == l).sum()), l))
        for rank, cluster in enumerate(clusters):
            members = [c for c, l in zip(members_of_class, labels) if l == cluster]
            cue_id = f"{explainer}:{label}:{rank}"
            for case in members:
                case.finding.cue_id = cue_id
            vectors = np.stack([c.descriptor for c in members])
            centre = vectors.mean(0)
            exemplars = [members[i] for i in np.argsort(((vectors - centre) ** 2).sum(1), kind="stable")[:config.exemplars]]
            cues.append({
                "cue_id": cue_id, "explainer": explainer, "label_name": label, "support": len(members),
                "flagged_in_class": len(members_of_class), "offset_x": float(centre[-8]),
                "offset_y": float(centre[-7]), "colour_mean": [float(v) for v in centre[-6:-3]],
                "colour_std": [float(v) for v in centre[-3:]],
                "exemplar_ids": [c.row["instance_id"] for c in exemplars],
                "exemplar_crops": [c.crop for c in exemplars], "_members": members,
            })
    return cues
