"""The one off-object rule: the share of an instance's map that lies off its object, the flags it raises, and
its off-object peak.

Two shares are kept. `off_object_share` is raw: the map's mass outside the object's box, cells cut by the
box edge counting by the fraction they overlap. At a stride-32 grid most objects are small next to a cell,
so even a perfectly placed map of a small or thin object has most of its mass "off" it by that measure.
`off_object_norm` is what the flags read: the map's mass on cells out of the object's reach, that is cells
the object's box does not touch even once grown by `reach_cells` cells (the receptive field a cell's token
sees around it). A map that sits on the cells its object touches has a normalised share of 0, whatever the
object's size, aspect and position on the grid.

The object is the matched GT box for a correct detection, duplicate or miss, and the crowd region for a
detection one absorbed; every GT box of the image for a false positive (its map should sit on some real
object, anything else is background); its own box where there is no GT. A crowd instance raises no flag:
COCO ignores it, and a region's loose box says little about where its one object is. The flags are computed
once, when a shard is audited (`pipeline.audit`), and written with it, so the faithfulness budget, the
findings step, the report and the FiftyOne views all read the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from eive_audit.pipeline.config import OUTCOME_ROLES, FindingsConfig, playing
from eive_audit.pipeline.geometry import Geometry
from eive_audit.pipeline.metrics.localization import box_coverage

OBJECT_OUTCOMES = playing("tp", "dup", "crowd", "fn")  # whose object is their GT box (a classifier's correct, missed)


class InstanceKey(NamedTuple):
    """An instance as the findings address it: one (instance, explainer) pair of the instances table."""

    instance_id: str
    explainer: str


@dataclass
class Flags:
    """The off-object columns of one instance row: the raw and normalised shares of its map off its object and
    the three flags (read from the normalised share)."""

    off_object_share: float
    off_object_norm: float
    flag_off_object: bool
    flag_background_fp: bool
    flag_miss_elsewhere: bool
    flag_reason: str | None = None  # why, in words, for the report and the FiftyOne App

    @property
    def flagged(self) -> bool:
        return self.flag_off_object or self.flag_background_fp or self.flag_miss_elsewhere

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Flags":
        """The flags an instances row holds (written when its shard was audited)."""
        return cls(**{f.name: row[f.name] for f in fields(Flags)})

    def columns(self) -> dict[str, Any]:
        """As instances-table columns."""
        return {f.name: getattr(self, f.name) for f in fields(Flags)}


@dataclass
class InstanceFinding(Flags):
    """Per (instance, explainer): the stored flags plus what the findings step adds to its row."""

    peak: tuple[int, int] | None = None  # grid cell (row, col) of the off-object peak (top-left of its window)
    peak_xy: tuple[float, float] | None = None  # the peak window's centre in original pixels
    peak_span: int = 1  # side of the peak window in cells: 1 for an attention peak, more once localised
    cue_id: str | None = None
    verification_drop: float | None = None
    localised_drop: float | None = None
    specificity: float | None = None  # localised drop minus the median tile's drop
    spurious_score: float = 0.0

    def set_peak(self, geometry: Geometry, cell: tuple[int, int], span: int = 1) -> None:
        """Put the peak on the `span` x `span` window of cells from `cell` (its top-left)."""
        x0, y0, x1, y1 = geometry.cells_to_pixels(*cell, span=span)
        self.peak, self.peak_span, self.peak_xy = cell, span, ((x0 + x1) / 2, (y0 + y1) / 2)


def object_cells(outcome: str, box: torch.Tensor, gt_boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cells [h, w] (coverage in [0, 1]) that count as an instance's object. box [4]: the instance's box (its
    GT box for tp / dup / crowd / fn, else its prediction); gt_boxes [G, 4]: the GT objects of its image;
    grid units."""
    boxes = gt_boxes if OUTCOME_ROLES[outcome] == "fp" and len(gt_boxes) else box[None]
    return box_coverage(boxes, grid).amax(0)


def reach(cells: torch.Tensor, reach_cells: int) -> torch.Tensor:
    """Cells [h, w] (bool) within `reach_cells` cells (king moves) of a cell the object covers at all."""
    touched = (cells > 0).float()[None, None]
    if reach_cells > 0:
        touched = F.max_pool2d(touched, 2 * reach_cells + 1, stride=1, padding=reach_cells)
    return touched[0, 0] > 0


def flag_map(outcome: str, saliency: torch.Tensor, cells: torch.Tensor, config: FindingsConfig) -> Flags:
    """The raw and normalised off-object shares of a map [h, w] whose object covers `cells` [h, w], and the
    flags the normalised one raises: a correct detection or duplicate looking off its object, a false positive
    driven by background, a miss whose best query looked elsewhere."""
    total = float(saliency.sum())
    share = float((saliency * (1 - cells)).sum()) / total if total > 0 else 0.0
    norm = float(saliency[~reach(cells, config.reach_cells)].sum()) / total if total > 0 else 0.0
    role = OUTCOME_ROLES[outcome]
    flags = Flags(off_object_share=share, off_object_norm=norm,
                  flag_off_object=role in ("tp", "dup") and norm >= config.off_object,
                  flag_background_fp=role == "fp" and norm >= config.background,
                  flag_miss_elsewhere=role == "fn" and norm >= config.off_object)
    flags.flag_reason = reason(flags, config, classify=role != outcome)
    return flags


def reason(flags: Flags, config: FindingsConfig, classify: bool = False) -> str | None:
    """Why an instance is flagged, in words (None when it is not): where its map went, against the threshold
    that flagged it, beside the raw share a reader might otherwise go by; in a classifier's words with
    `classify`."""
    if flags.flag_off_object:
        what = "correct prediction looking off its object" if classify else "correct detection looking off its object"
        box, threshold = "its object's box" if classify else "its box", config.off_object
    elif flags.flag_background_fp:
        what = "wrong class driven by background" if classify else "false positive driven by background"
        box, threshold = "any object box" if classify else "any GT box", config.background
    elif flags.flag_miss_elsewhere:
        what = "true class whose map looked elsewhere" if classify else "miss whose best query looked elsewhere"
        box, threshold = "its object's box" if classify else "its box", config.off_object
    else:
        return None
    cells = f"the cells {box} touches"
    if config.reach_cells:
        cells = f"{config.reach_cells} cell{'s' if config.reach_cells > 1 else ''} around " + cells
    return (f"{what}: {flags.off_object_norm:.0%} of its map lies beyond {cells} (flagged from {threshold:.0%}; "
            f"raw share off {box}: {flags.off_object_share:.0%})")


def off_object_peak(saliency: torch.Tensor, cells: torch.Tensor) -> tuple[int, int] | None:
    """The cell (row, col) where most of a map [h, w] lies off its object's `cells`; None if none does."""
    off = saliency * (1 - cells)
    if float(off.max()) <= 0:
        return None
    r, c = np.unravel_index(int(off.argmax()), off.shape)
    return int(r), int(c)


def row_box(row: dict[str, Any], prefix: str) -> list[float] | None:
    """The row's `<prefix>_x0..y1` box (original pixels), None where it has none."""
    values = [row[f"{prefix}_{c}"] for c in ("x0", "y0", "x1", "y1")]
    return None if values[0] is None else values


def instance_box(row: dict[str, Any]) -> list[float]:
    """The box an instance is about: its GT box for tp / dup / crowd / fn, else its predicted box."""
    gt = row_box(row, "gt")
    if row["outcome"] in OBJECT_OUTCOMES and gt is not None:
        return gt
    return row_box(row, "pred")  # type: ignore[return-value]  (every row has a predicted box)


def object_region(row: dict[str, Any], gt_boxes: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """`object_cells` of an instances row, `gt_boxes` [G, 4] in original pixels."""
    own = geometry.to_grid(torch.tensor([instance_box(row)], dtype=torch.float32))[0]
    return object_cells(row["outcome"], own, geometry.to_grid(gt_boxes.reshape(-1, 4)), geometry.grid)


@dataclass
class Case:
    """One (instance, explainer) under study: its row, finding, geometry, object cells and model label."""

    row: dict[str, Any]
    finding: InstanceFinding
    geometry: Geometry
    object_cells: torch.Tensor
    label: int

    @property
    def key(self) -> InstanceKey:
        return InstanceKey(self.row["instance_id"], self.row["explainer"])

    @property
    def box(self) -> list[float]:
        return instance_box(self.row)

    @property
    def explained_box(self) -> list[float]:
        """The box its detection score is measured on: the GT box for a miss, else the prediction."""
        return row_box(self.row, "gt" if self.row["outcome"] == "fn" else "pred")  # a classifier's: the image  # type: ignore[return-value]


def describe_instance(row: dict[str, Any], saliency: np.ndarray, gt_boxes: torch.Tensor, geometry: Geometry,
                      label: int) -> Case:
    """The case of an audited instances row: its stored flags, and the off-object peak cell of its map [h, w]
    (`gt_boxes` [G, 4]: the image's GT objects, original pixels)."""
    cells = object_region(row, gt_boxes, geometry)
    finding = InstanceFinding(**Flags.from_row(row).columns())
    peak = off_object_peak(torch.from_numpy(np.asarray(saliency, dtype=np.float32)), cells)
    if peak is not None:
        finding.set_peak(geometry, peak)
    return Case(row, finding, geometry, cells, label)
