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
