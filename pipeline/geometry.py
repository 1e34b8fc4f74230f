"""Where a stored map lies on its image: original pixels -> resized input -> padded input -> attention grid.

A DETR-family preprocessor resizes an image of `original` (H, W) pixels to `input` (h_in, w_in) (the
shortest / longest-edge rule), pastes it at the top-left of a `padded` (h_pad, w_pad) canvas shared by its
batch, and the backbone's attention grid of `grid` (h, w) cells covers that whole canvas. So the image fills
only the top-left `input / padded` fraction of the grid (its `extent`); the rest is padding. Every conversion
between original pixels and grid cells goes through `Geometry`, so the scores, the findings, the overlays and
the training losses read a map alike.

Sizes are (height, width), as the `images` table stores them. Boxes are xyxy: in original pixels, or in grid
units (cell (r, c) spans x in [c, c + 1), y in [r, r + 1)). A mask or map laid on the image may be drawn on any
`raster` (h, w) that covers the whole image (the original pixels by default, or a smaller copy of them: a
12000 x 9000 photo need not be drawn at full size), each raster pixel reading what lies under its centre.
This module imports no other project module (the review layer uses it too) and no model code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import ndimage

if TYPE_CHECKING:
    from eive_audit.pipeline.models.preprocess import PixelBatch

Size = tuple[int, int]  # (height, width)

# The `images` columns that hold each size (the grid is stored with the map instead).
_COLUMNS = {"original": ("height", "width"), "input": ("input_height", "input_width"),
            "padded": ("padded_height", "padded_width")}


def _size(name: str, value: Any) -> Size:
    h, w = (int(v) for v in value)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive (height, width), got {tuple(value)}")
    return h, w


@dataclass(frozen=True)
class Geometry:
    """One image's chain of sizes, each (height, width): `original` pixels, the resized `input`, the batch's
    `padded` input (at least `input` on both sides) and the attention `grid` over the padded input."""

    original: Size
    input: Size
    padded: Size
    grid: Size

    def __post_init__(self) -> None:
        for name in ("original", "input", "padded", "grid"):
            object.__setattr__(self, name, _size(name, getattr(self, name)))
        if self.input[0] > self.padded[0] or self.input[1] > self.padded[1]:
            raise ValueError(f"input size {self.input} cannot exceed padded size {self.padded}")

    @classmethod
    def from_image_row(cls, row: Mapping[str, Any], grid: Size) -> "Geometry":
        """The geometry of an `images` table row (its original, input and padded sizes) and a map's `grid`."""
        return cls(**{part: (row[h], row[w]) for part, (h, w) in _COLUMNS.items()}, grid=grid)

    @classmethod
    def from_batch(cls, batch: "PixelBatch", index: int, grid: Size) -> "Geometry":
        """The geometry of image `index` of a preprocessed batch whose features lie on `grid`."""
        return cls(tuple(batch.original_sizes[index].tolist()), tuple(batch.input_sizes[index].tolist()),
                   tuple(batch.pixel_values.shape[-2:]), grid)

    def image_columns(self) -> dict[str, int]:
        """The sizes as `images` table columns (`height`, `width`, `input_height`, ...): what `from_image_row` reads."""
        return {column: value for part, names in _COLUMNS.items() for column, value in zip(names, getattr(self, part))}

    @property
    def cells_per_pixel(self) -> tuple[float, float]:
        """(y, x) grid cells per original pixel, through the resize and the padding."""
        (oh, ow), (ih, iw), (ph, pw), (gh, gw) = self.original, self.input, self.padded, self.grid
        return (ih / oh) * (gh / ph), (iw / ow) * (gw / pw)

    @property
    def extent(self) -> tuple[float, float]:
        """(h, w) of the image itself on the grid, in cells: the top-left input / padded fraction of it."""
        (ih, iw), (ph, pw), (gh, gw) = self.input, self.padded, self.grid
        return gh * ih / ph, gw * iw / pw

    def to_grid(self, boxes: torch.Tensor) -> torch.Tensor:
        """xyxy boxes [K, 4] in original pixels -> float32 [K, 4] in grid units."""
        sy, sx = self.cells_per_pixel
        return boxes.float() * boxes.new_tensor([sx, sy, sx, sy], dtype=torch.float32)

    def cells_to_pixels(self, row: int, col: int, radius: int = 0, span: int = 1,
                        raster: Size | None = None) -> tuple[int, int, int, int]:
        """The pixel rectangle (x0, y0, x1, y1), end exclusive, of the original image (or of `raster`) under
        the `span` x `span` cells from (row, col) and `radius` cells around them; clipped to the image, never
        empty."""
        (oh, ow), (ih, iw) = _size("raster", raster or self.original), self.input
        (ph, pw), (gh, gw) = self.padded, self.grid
        sx, sy = (pw / gw) * (ow / iw), (ph / gh) * (oh / ih)  # raster pixels per cell
        x0, x1 = max(0, int((col - radius) * sx)), min(ow, math.ceil((col + span + radius) * sx))
        y0, y1 = max(0, int((row - radius) * sy)), min(oh, math.ceil((row + span + radius) * sy))
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)

    def pixel_to_cell(self, x: float, y: float) -> tuple[int, int]:
        """The grid cell (row, col) under original pixel coordinates (x, y), clamped to the grid."""
        (oh, ow), (ih, iw), (ph, pw), (gh, gw) = self.original, self.input, self.padded, self.grid
        return min(int(y / oh * (ih / ph) * gh), gh - 1), min(int(x / ow * (iw / pw) * gw), gw - 1)

    def cells_to_mask(self, cells: torch.Tensor, raster: Size | None = None) -> torch.Tensor:
        """A cell mask [h, w] -> [H, W] on the original pixels (or on `raster`): each pixel takes the cell
        under its centre, so padding cells never reach the image."""
        (rh, rw), (gh, gw) = _size("raster", raster or self.original), self.grid
        valid_h, valid_w = self.extent
        ys = np.minimum(((np.arange(rh, dtype=np.float32) + 0.5) / rh * np.float32(valid_h)).astype(np.int64), gh - 1)
        xs = np.minimum(((np.arange(rw, dtype=np.float32) + 0.5) / rw * np.float32(valid_w)).astype(np.int64), gw - 1)
        return cells[ys][:, xs]

    def box_to_mask(self, box: Any, raster: Size | None = None) -> torch.Tensor:
        """An xyxy box in original pixels -> bool [H, W] on the original pixels (or on `raster`): the pixels
        whose centre lies in the box."""
        (oh, ow), (rh, rw) = self.original, _size("raster", raster or self.original)
        x0, y0, x1, y1 = (float(v) for v in box)
        ys = (torch.arange(rh, dtype=torch.float64) + 0.5) * (oh / rh)
        xs = (torch.arange(rw, dtype=torch.float64) + 0.5) * (ow / rw)
        return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]

    def map_to_image(self, values: np.ndarray, order: int = 1, raster: Size | None = None) -> np.ndarray:
        """A map [h, w] on the grid -> float32 [H, W] on the original pixels (or [h', w'] on `raster`).

        order 1 interpolates bilinearly between cell centres (what a reviewer should look at); 0 keeps each
        cell constant over its area, which is how the localisation scores read a map. Only the cells the image
        covers are sampled: coordinates past its last cell are clamped to it rather than blended with padding.
        Values are not normalised."""
        if order not in (0, 1):
            raise ValueError(f"order must be 0 (cells) or 1 (bilinear), got {order}")
        values = np.asarray(values, dtype=np.float32)
        if values.shape != self.grid:
            raise ValueError(f"map has shape {values.shape} but grid is {self.grid}")
        (oh, ow), shape = self.original, _size("raster", raster or self.original)
        sy, sx = self.cells_per_pixel
        sy, sx = sy * oh / shape[0], sx * ow / shape[1]  # grid cells per raster pixel
        valid_h, valid_w = self.extent
        covered = values[:math.ceil(valid_h - 1e-9), :math.ceil(valid_w - 1e-9)]
        # Output pixel centre y + 0.5 sits at (y + 0.5) * sy grid units; cell k's centre is at k + 0.5.
        return ndimage.affine_transform(covered, (sy, sx), offset=(0.5 * sy - 0.5, 0.5 * sx - 0.5),
                                        output_shape=shape, order=order, mode="nearest").astype(np.float32)
