"""Verification and localisation of an instance's reliance on its surroundings, by re-scoring it blurred.

Verification blurs the surroundings of every instance of an image at once (a ring around each box, plus each
off-object peak, the boxes themselves kept) in one forward per image, and stores each instance's relative
score drop. Localisation, for confirmed reliance, blurs those surroundings one tile at a time, then one small
window at a time inside the tile that hurt most: the window whose blur hurts most becomes the peak. Both are
budgeted by the caller (a forward costs seconds for a real-size detector on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from eive_audit.pipeline.config import FindingsConfig
from eive_audit.pipeline.findings.flags import Case, InstanceKey
from eive_audit.pipeline.models.targets import instance_scores
from eive_audit.pipeline.metrics.localization import box_coverage
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.progress import step
from eive_audit.pipeline.sources.decode import decode_rgb


@dataclass(frozen=True)
class Job:
    """One re-score of localisation: image `image` of the batch with `cells` [h, w] of the case's stored grid
    blurred; `window` is the top-left cell of the tile or window those cells are."""

    image: int
    case: Case
    cells: torch.Tensor
    window: tuple[int, int]


@dataclass(frozen=True)
class CaseBatch:
    """Images the cases belong to, preprocessed anew: the batch, the decoded pictures (each at most the model's
    longest input edge on a side, so a large image is a smaller copy of its original) and each one's cases.
    The batch need not pad like the audit's did, so regions travel between the two geometries through the
    original image's frame (`Geometry` rasters)."""

    batch: PixelBatch
    pictures: list[torch.Tensor]
    cases: list[list[Case]]


def candidate_region(case: Case, context_cells: int) -> torch.Tensor:
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


def image_batches(adapter: DetrAdapter, cases: list[Case], images: dict[int, dict[str, Any]],
                  batch_size: int, step_name: str) -> Iterator[CaseBatch]:
    """The images the cases belong to, `batch_size` per batch, in image id order; reported as progress step
    `step_name` (one unit an image), since these loops are where findings spend their minutes."""
    by_image: dict[int, list[Case]] = {}
    for case in cases:
        by_image.setdefault(case.row["image_id"], []).append(case)
    ids = sorted(by_image)
    with step(step_name, len(ids)) as advance:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            pictures = [decode_rgb(Path(images[i]["file_path"]), adapter.preprocess_config.longest_edge)
                        for i in chunk]
            with torch.inference_mode():
                batch = adapter.preprocess(pictures, [(images[i]["height"], images[i]["width"]) for i in chunk])
            yield CaseBatch(batch, pictures, [by_image[i] for i in chunk])
            advance(len(chunk))


def verify(adapter: DetrAdapter, cases: list[Case], images: dict[int, dict[str, Any]], config: FindingsConfig,
           batch_size: int) -> None:
    """Fill each case's `verification_drop`: the surroundings (`candidate_region`) of every case of its image
    blurred at once, all their boxes kept and left out of the blur, in one forward per image. A drop is the
    detection's loss to what lies around the objects of its image, mostly around its own; localisation (one
    case at a time) tells whose surroundings and where."""
    for part in image_batches(adapter, cases, images, batch_size, "findings: verifying"):
        batch, device = part.batch, part.batch.pixel_values.device
        regions, fills = [], []
        for b, mine in enumerate(part.cases):
            boxes = torch.stack([_box_mask(batch, b, case) for case in mine]).any(0)
            cells = torch.stack([_cells_mask(batch, b, case, candidate_region(case, config.context_cells))
                                 for case in mine]).any(0)
            regions.append(cells & ~boxes)
            fills.append(_blur_around(batch, b, boxes, config.blur_sigma))
        cases_of_batch = [(b, case) for b, mine in enumerate(part.cases) for case in mine]
        with torch.inference_mode():
            perturbed = torch.where(torch.stack(regions).to(device)[:, None], torch.stack(fills), batch.pixel_values)
            intact = _scores(adapter.predict(batch.pixel_values, batch.pixel_mask), cases_of_batch, device)
            blurred = _scores(adapter.predict(perturbed, batch.pixel_mask), cases_of_batch, device)
        for (_, case), drop in zip(cases_of_batch, (1 - blurred / intact.clamp(min=1e-6)).tolist()):
            case.finding.verification_drop = drop


def _scores(predictions: tuple[torch.Tensor, torch.Tensor], cases: list[tuple[int, Case]],
            device: torch.device) -> torch.Tensor:
    """Each case's detection score in the predictions of the image it belongs to (`instance_scores`)."""
    index = torch.tensor([b for b, _ in cases], device=device)
    box, labels = _targets([case for _, case in cases], device)
    probs, boxes = predictions
    return instance_scores(probs[index], boxes[index], labels, box)


Windows = list[tuple[tuple[int, int], torch.Tensor]]  # (top-left cell, cells [h, w]) per window


def _windows(region: torch.Tensor, side: int, corners: set[tuple[int, int]]) -> Windows:
    """The `side`-wide windows at `corners` (top-left cells, clipped into the grid) as (corner, cells [h, w])
    of `region`, each distinct and non-empty, in row-major order of their corners."""
    gh, gw = region.shape
    found: dict[bytes, tuple[tuple[int, int], torch.Tensor]] = {}
    clipped = {(min(max(t, 0), max(gh - side, 0)), min(max(l, 0), max(gw - side, 0))) for t, l in corners}
    for top, left in sorted(clipped):
        window = torch.zeros_like(region)
        window[top:top + side, left:left + side] = True
        window &= region
        if window.any():
            found.setdefault(window.numpy().tobytes(), ((top, left), window))
    return list(found.values())


def tiles(case: Case, config: FindingsConfig) -> Windows:
    """The coarse pass of localisation: a case's surroundings cut into tiles of twice the window's side."""
    region = candidate_region(case, config.context_cells)
    side = 2 * config.window_cells
    return _windows(region, side, {(r // side * side, c // side * side) for r, c in region.nonzero().tolist()})


def refinements(case: Case, config: FindingsConfig, tile: tuple[int, int]) -> Windows:
    """The fine pass: every window of `window_cells` inside the tile at `tile` (its top-left cell), at a stride
    of one cell."""
    k = config.window_cells
    return _windows(candidate_region(case, config.context_cells), k,
                    {(tile[0] + dr, tile[1] + dc) for dr in range(k + 1) for dc in range(k + 1)})


def localisation_cost(case: Case, config: FindingsConfig) -> int:
    """Forwards that localising a case may take: its tiles, plus at most every window of one tile."""
    return len(tiles(case, config)) + (config.window_cells + 1) ** 2


def localise(adapter: DetrAdapter, cases: list[Case], images: dict[int, dict[str, Any]], config: FindingsConfig,
             batch_size: int) -> None:
    """Coarse to fine: blur each tile of each case's surroundings on its own, then each window inside the tile
    that cost the most score. That window becomes the case's peak (ties: the first in row-major order), its
    drop the `localised_drop`, and that drop minus the median tile's drop the `specificity` (a shortcut is one
    place: the other tiles cost little). About 25 forwards a case on a 16 x 16 grid, where every window would
    take 200."""
    for part in image_batches(adapter, cases, images, batch_size, "findings: localising"):
        mine = [(b, case) for b, of_image in enumerate(part.cases) for case in of_image]
        with torch.inference_mode():  # both passes share the intact forward and each case's blurred fill
            intact = adapter.predict(part.batch.pixel_values, part.batch.pixel_mask)
        fills = {case.key: _blur_around(part.batch, b, _box_mask(part.batch, b, case), config.blur_sigma)
                 for b, case in mine}
        coarse = _drops(adapter, part.batch, [Job(b, case, cells, corner) for b, case in mine
                                              for corner, cells in tiles(case, config)], intact, fills, batch_size)
        best_tile = {key: max(values, key=lambda item: item[0])[1] for key, values in coarse.items()}
        fine = _drops(adapter, part.batch, [Job(b, case, cells, corner) for b, case in mine if case.key in coarse
                                            for corner, cells in refinements(case, config, best_tile[case.key])],
                      intact, fills, batch_size)
        for _, case in mine:
            if case.key not in fine:
                continue
            drop, corner = max(fine[case.key], key=lambda item: item[0])
            finding = case.finding
            finding.localised_drop = drop
            finding.specificity = drop - float(np.median([d for d, _ in coarse[case.key]]))
            finding.set_peak(case.geometry, corner, span=config.window_cells)


Drops = dict[InstanceKey, list[tuple[float, tuple[int, int]]]]  # per case: (drop, window corner) per job


def _drops(adapter: DetrAdapter, batch: PixelBatch, jobs: list[Job], intact: tuple[torch.Tensor, torch.Tensor],
           fills: dict[InstanceKey, torch.Tensor], batch_size: int) -> Drops:
    """Each job's drop, with its window's corner, per case (jobs in row-major order of their corners)."""
    drops: Drops = {}
    for job, drop in zip(jobs, rescore(adapter, batch, jobs, intact, fills, batch_size)):
        drops.setdefault(job.case.key, []).append((drop, job.window))
    return drops


def rescore(adapter: DetrAdapter, batch: PixelBatch, jobs: list[Job], intact: tuple[torch.Tensor, torch.Tensor],
            fills: dict[InstanceKey, torch.Tensor], batch_size: int) -> list[float]:
    """Relative score drop of each job against the batch's `intact` predictions (probs, boxes) when its cells are
    filled with its case's `fills` (the image blurred with the object left out, by normalised convolution, so
    that no object colour bleeds into the region and reshapes the object's outline)."""
    pixels, mask = batch.pixel_values, batch.pixel_mask
    probs, out_boxes = intact
    drops: list[float] = []
    with torch.inference_mode():
        for part in range(0, len(jobs), batch_size):  # masks at input size exist one part at a time
            chunk = jobs[part:part + batch_size]
            index = torch.tensor([job.image for job in chunk], device=pixels.device)
            region = torch.stack([  # cells are coarse: spare the object
                _cells_mask(batch, job.image, job.case, job.cells) & ~_box_mask(batch, job.image, job.case)
                for job in chunk]).to(pixels.device)
            box, labels = _targets([job.case for job in chunk], pixels.device)
            before = instance_scores(probs[index], out_boxes[index], labels, box)
            fill = torch.stack([fills[job.case.key] for job in chunk])
            perturbed = adapter.predict(torch.where(region[:, None], fill, pixels[index]), mask[index])
            drops += (1 - instance_scores(*perturbed, labels, box) / before.clamp(min=1e-6)).tolist()
    return drops


def _input_size(batch: PixelBatch, b: int) -> tuple[int, int]:
    return int(batch.input_sizes[b][0]), int(batch.input_sizes[b][1])


def _padded(mask: torch.Tensor, batch: PixelBatch) -> torch.Tensor:
    """A boolean mask at an image's input size, padded like the batch (the image sits top-left)."""
    pad = (0, batch.pixel_values.shape[-1] - mask.shape[-1], 0, batch.pixel_values.shape[-2] - mask.shape[-2])
    return F.pad(mask, pad)


def _box_mask(batch: PixelBatch, b: int, case: Case) -> torch.Tensor:
    """A case's box as a boolean mask of the batch's padded input (drawn at input size: a mask of the original
    pixels would be 100 M entries for a 12000 x 9000 photo); the case's image is image `b` of the batch."""
    return _padded(case.geometry.box_to_mask(case.box, _input_size(batch, b)), batch)


def _cells_mask(batch: PixelBatch, b: int, case: Case, cells: torch.Tensor) -> torch.Tensor:
    """Cells [h, w] of a case's stored grid as a boolean mask of the batch's padded input."""
    return _padded(case.geometry.cells_to_mask(cells, _input_size(batch, b)), batch)


def _targets(cases: list[Case], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised cxcywh boxes and model labels that each case's detection is scored on."""
    boxes = []
    for case in cases:
        oh, ow = case.geometry.original
        boxes.append(torch.tensor(case.explained_box) / torch.tensor([ow, oh, ow, oh], dtype=torch.float32))
    labels = torch.tensor([case.label for case in cases], device=device)
    return box_convert(torch.stack(boxes), "xyxy", "cxcywh").to(device), labels


def _blur_around(batch: PixelBatch, b: int, left_out: torch.Tensor, sigma: float) -> torch.Tensor:
    """Image `b` of the batch blurred by normalised convolution over its pixels outside `left_out` (and
    outside the padding), so no object colour bleeds into what the blur fills."""
    with torch.inference_mode():
        kept = (~left_out.to(batch.pixel_values.device) & batch.pixel_mask[b].bool())[None, None].float()
        source = batch.pixel_values[b:b + 1] * kept
        return (separable_blur(source, sigma) / separable_blur(kept, sigma).clamp(min=1e-6))[0]


def separable_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """torchvision's `gaussian_blur` of images [B, C, H, W] (kernel 2 * round(3 sigma) + 1, reflect padding),
    as two 1-D passes: the same result, at 2k instead of k^2 multiply-adds per pixel (k = 61 at sigma 10)."""
    half = int(round(3 * sigma))
    x = torch.linspace(-half, half, 2 * half + 1, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    padded = F.pad(images, (half, half, half, half), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
