"""Lay a stored saliency map back onto the original image it explains, as the HTML report and the FiftyOne
push draw it.

The geometry (the image fills only the top-left input / padded fraction of a map's grid) is
`pipeline.geometry.Geometry`, the same one the localisation scores read boxes with, so an overlay and the
scores computed from its map agree. This module only adds reading the map as stored.
"""

from __future__ import annotations

import numpy as np

from eive_audit.pipeline.geometry import Geometry
from eive_audit.storage.maps import decode_map


def map_to_image(grid_map: np.ndarray | bytes, geometry: Geometry, order: int = 1,
                 raster: tuple[int, int] | None = None) -> np.ndarray:
    """A grid map -> float32 [H, W] on the original image's pixels, or on `raster` (h, w), a smaller copy of
    them (see `Geometry.map_to_image`).

    grid_map: the map as stored (float16 bytes, decoded with `geometry.grid`) or an array of that shape;
    geometry: the image's (e.g. `Geometry.from_image_row` of its `images` row and the map's grid);
    order: 1 bilinear between cell centres, 0 each cell constant over its area.
    """
    values = decode_map(grid_map, *geometry.grid) if isinstance(grid_map, bytes) else grid_map
    return geometry.map_to_image(values, order, raster)


# `pipeline.findings.clustering.crop` rounds each crop edge outwards to a whole pixel of the picture and enlarges
# the crop 4 times: an axis may come out up to this many crop pixels longer than its cells span.
_CROP_ROUNDING = 2 * 4


def peak_in_crop(crop_size: tuple[int, int], geometry: Geometry, peak_xy: tuple[float, float]) -> tuple[float, float]:
    """Where an instance's peak window is centred in its cue crop: (x, y) in the crop's pixels.

    crop_size: the crop's (width, height); geometry: the instance's image and map grid; peak_xy: its stored
    peak_x, peak_y (original pixels). A crop is the peak window and one cell around it, as many cells across as
    down, so the peak is at its centre unless the image border cut it short. The crop's shape tells which axis
    was cut (one shorter than the other axis and the cells' aspect make it), the peak's side of the image tells
    at which end. A crop cut on both axes (a corner) keeps the cells' aspect and is read as uncut, so there the
    mark may be up to half a cell off the peak.
    """
    width, height = crop_size
    (oh, ow), (ih, iw), (ph, pw), (gh, gw) = geometry.original, geometry.input, geometry.padded, geometry.grid
    aspect = (pw / gw * ow / iw) / (ph / gh * oh / ih)  # a cell's width over its height, in any raster
    return (_centre_along(width, height * aspect, peak_xy[0] < ow / 2),
            _centre_along(height, width / aspect, peak_xy[1] < oh / 2))


def _centre_along(length: float, uncut: float, cut_at_start: bool) -> float:
    """The peak window's centre along one crop axis `length` long that would be `uncut` long without the
    image border; the border is at the axis' start (left, top) when `cut_at_start`."""
    if uncut - length <= _CROP_ROUNDING:
        return length / 2
    return max(0.0, length - uncut / 2) if cut_at_start else min(length, uncut / 2)
