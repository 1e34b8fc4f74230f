"""The one place an image file becomes a size or pixels: EXIF orientation applied, any mode to 8-bit RGB,
large images decoded small.

The size a source gives its records is the *display* size: the image as a viewer shows it once its EXIF
orientation is applied (as `PIL.ImageOps.exif_transpose` does it, and FiftyOne sizes a JPEG for its App), so
boxes annotated on what a person saw line up with the pixels the model gets. The orientation is read from
what Pillow parses when it opens a file (JPEG / MPO, TIFF, WebP, a PNG's eXIf chunk ahead of its pixels), so
reading a size never decodes pixels; `decode_rgb` takes the orientation from the same reading, so the decoded
picture always has the record's shape.

Memory: a JPEG is never decoded at full size when a smaller one is asked for. Pillow's draft mode decodes
it at 1/2, 1/4 or 1/8 scale straight from the file (the smallest that still covers the requested size), so
`decode_rgb(path, max_side)` of a W x H JPEG holds at most max((2 * max_side)^2, W * H / 64) decoded pixels
(3 bytes each) before the final resize: for a 12000 x 9000 photo 1500 x 1125 pixels (5 MB) at any max_side up
to 1500 (DETR's 1333 included), against 324 MB decoded whole. Other formats have no such mode and are decoded
whole, then resized (a few full-size copies of the image). Pillow's decompression-bomb limit stays in force: a file
over 2 * MAX_IMAGE_PIXELS pixels raises `DecompressionBombError` at open, which the callers record as an
unreadable image.

This module imports nothing from the rest of the project (sources come first in the pipeline).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

# Orientations that swap width and height (transpose, rotate 270, transverse, rotate 90).
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_VALID_ORIENTATIONS = frozenset(range(1, 9))
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag (1..8) Pillow parsed when opening the file, or None if there is none.

    A PNG whose eXIf chunk follows its pixel data would only yield it after a full decode, so that case
    counts as none: a size must stay a header read."""
    if image.format == "PNG" and "exif" not in image.info:
        return None
    value = image.getexif().get(ExifTags.Base.Orientation)
    return int(value) if value in _VALID_ORIENTATIONS else None


def display_size(path: Path) -> tuple[int, int, int | None]:
    """(width, height, orientation) of an image as displayed, from its header; orientation is the EXIF tag
    applied (None without one). Raises on a missing, corrupt or decompression-bomb file."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = _orientation(image)
    return (height, width, orientation) if orientation in _SWAPS_SIDES else (width, height, orientation)


def fit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down to fit `max_side` on its longer side, aspect kept; never scaled up."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB. Wide integer modes (16-bit gray, 'I') keep their top 8 bits of the 16-bit
    range, float ('F') is read as [0, 1]: Pillow's own conversion would clip them at 255 instead. The rest
    (palette, 1-bit, LA, RGBA, CMYK, YCbCr...) is Pillow's conversion; alpha is dropped."""
    if image.mode in _WIDE_INTEGER_MODES:
        values = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
    elif image.mode == "F":
        values = np.rint(np.nan_to_num(np.asarray(image, dtype=np.float32)).clip(0.0, 1.0) * 255)
    else:
        return image if image.mode == "RGB" else image.convert("RGB")
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")  # a 2-D uint8 array is mode L


def decode_rgb(path: Path, max_side: int | None) -> torch.Tensor:
    """The image at `path` as displayed (EXIF orientation applied), uint8 RGB [3, h, w], scaled down to fit
    `max_side` (None: full size): (w, h) is `fit_size` of the display size. Raises on a missing, corrupt or
    decompression-bomb file."""
    with Image.open(path) as image:
        orientation = _orientation(image)
        raw_w, raw_h = image.size
        draft = fit_size(raw_w, raw_h, max_side)
        if draft != (raw_w, raw_h):
            image.draft("RGB", draft)  # JPEG: decode at the smallest 1/2^k scale that still covers the size
        upright = ImageOps.exif_transpose(image) if orientation not in (None, 1) else image
        picture = _to_rgb8(upright)
        width, height = (raw_h, raw_w) if orientation in _SWAPS_SIDES else (raw_w, raw_h)
        size = fit_size(width, height, max_side)
        if picture.size != size:
            picture = picture.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
        return torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous()
