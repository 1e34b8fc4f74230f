"""Lay a stored saliency map back onto the original image it explains.

A stored map lives on the attention grid of the model's *padded* input: the image was resized to
`input_size` (DETR's shortest/longest-edge rule) and pasted at the top-left of a `padded_size` canvas shared
by its batch, and the grid covers that whole canvas. So the image occupies only the top-left
input/padded fraction of the grid, and that fraction, not the whole map, must be stretched over the
original image. The scale is the same one `pipeline.metrics.localization.boxes_to_grid` uses for boxes, so
an overlay and the scores computed from it agree. Shared by the HTML report and the FiftyOne push.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from eive_audit.storage.maps import decode_map

Size = tuple[int, int]  # (height, width), as the `images` table stores them


def _positive(name: str, size: Size) -> tuple[int, int]:
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive (height, width), got {size}")
    return h, w


def map_to_image(grid_map: np.ndarray | bytes, grid: Size, image_size: Size, input_size: Size, padded_size: Size,
                 order: int = 1) -> np.ndarray:
    """A grid map -> float32 [image_h, image_w] on the original image's pixels.

    grid_map: the map as stored (float16 bytes, decoded with `grid`) or an array of shape `grid`.
    grid, image_size, input_size, padded_size: (height, width) of the attention grid, the original image,
    the resized model input and the batch's padded input (the `maps` and `images` columns).
    order: 1 interpolates bilinearly between cell centres (what a reviewer should look at); 0 keeps each
    cell constant over its area, which is how the localisation scores read a map.

    Only the cells the image covers are sampled: coordinates past the image's last cell are clamped to it
    rather than blended with padding. Values are not normalised.
    """
    gh, gw = _positive("grid", grid)
    oh, ow = _positive("image_size", image_size)
    ih, iw = _positive("input_size", input_size)
    ph, pw = _positive("padded_size", padded_size)
    if ih > ph or iw > pw:
        raise ValueError(f"input_size {input_size} cannot exceed padded_size {padded_size}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (cells) or 1 (bilinear), got {order}")
    values = decode_map(grid_map, gh, gw) if isinstance(grid_map, bytes) else np.asarray(grid_map, dtype=np.float32)
    if values.shape != (gh, gw):
        raise ValueError(f"map has shape {values.shape} but grid is {(gh, gw)}")
    # Grid cells per original pixel, through the resize and the padding (as boxes_to_grid).
    sy, sx = (ih / oh) * (gh / ph), (iw / ow) * (gw / pw)
    covered = values[:math.ceil(ih * gh / ph - 1e-9), :math.ceil(iw * gw / pw - 1e-9)]
    # Output pixel centre y + 0.5 sits at (y + 0.5) * sy grid units; cell k's centre is at k + 0.5.
    return ndimage.affine_transform(covered, (sy, sx), offset=(0.5 * sy - 0.5, 0.5 * sx - 0.5),
                                    output_shape=(oh, ow), order=order, mode="nearest").astype(np.float32)
