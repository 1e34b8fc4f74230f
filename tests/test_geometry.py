"""The one geometry op (pipeline.geometry): hand-computed values of every conversion, then properties."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eive_audit.pipeline.geometry import Geometry
from eive_audit.pipeline.models.preprocess import PixelBatch

# A 60 x 120 image resized to 40 x 80 (scale 2/3) and padded to 80 x 96 beside a batch-mate; stride 8 gives a
# 10 x 12 grid. A cell is 8 input pixels = 12 original pixels on each side, and the image covers the top-left
# 40 / 80 * 10 = 5 rows and 80 / 96 * 12 = 10 columns of cells; the rest is padding.
GEOMETRY = Geometry(original=(60, 120), input=(40, 80), padded=(80, 96), grid=(10, 12))


def test_every_conversion_against_hand_computed_values() -> None:
    assert GEOMETRY.cells_per_pixel == pytest.approx((1 / 12, 1 / 12))
    assert GEOMETRY.extent == (5.0, 10.0)
    # x 24..84, y 12..48 px are 2..7 and 1..4 cells (divide by 12); the whole image is the 10 x 5 extent
    boxes = torch.tensor([[24.0, 12.0, 84.0, 48.0], [0.0, 0.0, 120.0, 60.0]])
    torch.testing.assert_close(GEOMETRY.to_grid(boxes), torch.tensor([[2.0, 1.0, 7.0, 4.0], [0.0, 0.0, 10.0, 5.0]]))
    # cell (1, 2) is x 24..36, y 12..24; with a 2 x 2 span and a 1-cell ring, cells 1..4 x 0..3 -> x 12..60, y 0..48
    assert GEOMETRY.cells_to_pixels(1, 2) == (24, 12, 36, 24)
    assert GEOMETRY.cells_to_pixels(1, 2, radius=1, span=2) == (12, 0, 60, 48)
    # around the last image cell (4, 9) the ring would reach x 132 and y 72: clipped to the 120 x 60 image
    assert GEOMETRY.cells_to_pixels(4, 9, radius=1) == (96, 36, 120, 60)
    # (30, 18) px is (2.5, 1.5) cells; the far corner stays in the last image cell, never in the padding
    assert GEOMETRY.pixel_to_cell(30.0, 18.0) == (1, 2)
    assert GEOMETRY.pixel_to_cell(119.9, 59.9) == (4, 9)

    cells = torch.zeros(10, 12, dtype=torch.bool)
    cells[1, 2] = True  # original y 12..23, x 24..35 (end inclusive)
    cells[5:, :] = cells[:, 10:] = True  # padding: reaches no pixel
    ys, xs = np.nonzero(GEOMETRY.cells_to_mask(cells).numpy())
    assert (ys.min(), ys.max(), xs.min(), xs.max(), len(ys)) == (12, 23, 24, 35, 144)
    hot = np.zeros((10, 12), np.float32)
    hot[1, 2] = 1.0
    hot[5:, :] = hot[:, 10:] = 1.0
    image = GEOMETRY.map_to_image(hot, order=0)  # the same pixels as the cell mask, as constants
    assert image.shape == (60, 120) and np.array_equal(image > 0, GEOMETRY.cells_to_mask(cells).numpy())


def test_a_smaller_raster_of_the_image_reads_the_same_cells() -> None:
    """A 30 x 60 raster is the 60 x 120 image at half size: a cell is 6 raster pixels a side."""
    half = (30, 60)
    assert GEOMETRY.cells_to_pixels(1, 2, raster=half) == (12, 6, 18, 12)
    assert GEOMETRY.cells_to_pixels(4, 9, radius=1, raster=half) == (48, 18, 60, 30)
    cells = torch.zeros(10, 12, dtype=torch.bool)
    cells[1, 2] = True
    cells[5:, :] = True  # padding: reaches no pixel
    ys, xs = np.nonzero(GEOMETRY.cells_to_mask(cells, half).numpy())
    assert (ys.min(), ys.max(), xs.min(), xs.max(), len(ys)) == (6, 11, 12, 17, 36)
    hot = cells.numpy().astype(np.float32)
    image = GEOMETRY.map_to_image(hot, order=0, raster=half)
    assert image.shape == half and np.array_equal(image > 0, GEOMETRY.cells_to_mask(cells, half).numpy())
    # box x 24..84, y 12..48 px: pixel centres inside are original x 24..83, y 12..47; half of that at half size
    box = [24.0, 12.0, 84.0, 48.0]
    for raster, (y0, y1, x0, x1) in ((None, (12, 47, 24, 83)), (half, (6, 23, 12, 41))):
        ys, xs = np.nonzero(GEOMETRY.box_to_mask(box, raster).numpy())
        assert (ys.min(), ys.max(), xs.min(), xs.max()) == (y0, y1, x0, x1)


def test_the_grid_follows_resize_and_padding_on_both_axes() -> None:
    # 200 x 100 (w x h) image resized to 400 x 200, padded to 416 x 224, grid 13 x 7 (stride 32): x px * 2 / 32.
    geometry = Geometry(original=(100, 200), input=(200, 400), padded=(224, 416), grid=(7, 13))
    torch.testing.assert_close(geometry.to_grid(torch.tensor([[32.0, 16.0, 64.0, 48.0]])),
                               torch.tensor([[2.0, 1.0, 4.0, 3.0]]))


def test_a_cell_mask_skips_the_padding() -> None:
    # A 40 x 80 image shown as a 20 x 40 input padded to 40 x 40 on an 8 x 8 grid: the image fills rows 0..3.
    geometry = Geometry(original=(40, 80), input=(20, 40), padded=(40, 40), grid=(8, 8))
    cells = torch.zeros(8, 8, dtype=torch.bool)
    cells[1, 2] = True  # input pixels y 5..10, x 10..15 -> original y 10..20, x 20..30
    ys, xs = np.nonzero(geometry.cells_to_mask(cells).numpy())
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 19, 20, 29)


def test_constructors_agree_with_the_images_row_and_the_batch() -> None:
    row = GEOMETRY.image_columns()
    assert row == {"height": 60, "width": 120, "input_height": 40, "input_width": 80, "padded_height": 80,
                   "padded_width": 96}
    assert Geometry.from_image_row(row, (10, 12)) == GEOMETRY
    batch = PixelBatch(torch.zeros(2, 3, 80, 96), torch.ones(2, 80, 96), torch.tensor([[40, 80], [80, 96]]),
                       torch.tensor([[60, 120], [80, 96]]))
    assert Geometry.from_batch(batch, 0, (10, 12)) == GEOMETRY
    with pytest.raises(ValueError, match="exceed"):
        replace(GEOMETRY, input=(90, 80))
    with pytest.raises(ValueError, match="positive"):
        replace(GEOMETRY, grid=(0, 12))
    with pytest.raises(ValueError, match="grid"):
        GEOMETRY.map_to_image(np.zeros((12, 10), np.float32))


@st.composite
def geometries(draw: st.DrawFn) -> Geometry:
    """An image resized by some factor, padded by up to 64 px per side, on a stride-8 / 16 / 32 grid."""
    oh, ow = draw(st.integers(1, 400)), draw(st.integers(1, 400))
    factor = draw(st.floats(0.25, 4.0))
    ih, iw = max(1, round(oh * factor)), max(1, round(ow * factor))
    ph, pw = ih + draw(st.integers(0, 64)), iw + draw(st.integers(0, 64))
    stride = draw(st.sampled_from([8, 16, 32]))
    return Geometry((oh, ow), (ih, iw), (ph, pw), (math.ceil(ph / stride), math.ceil(pw / stride)))


@settings(max_examples=100, deadline=None)
@given(geometries())
def test_a_box_over_the_whole_image_maps_to_its_extent_on_the_grid(geometry: Geometry) -> None:
    (oh, ow), (eh, ew) = geometry.original, geometry.extent
    box = geometry.to_grid(torch.tensor([[0.0, 0.0, ow, oh]], dtype=torch.float64))[0].tolist()
    assert box == pytest.approx([0.0, 0.0, ew, eh], rel=1e-5)
    assert ew <= geometry.grid[1] and eh <= geometry.grid[0]
    assert geometry.cells_to_mask(torch.ones(geometry.grid, dtype=torch.bool)).all()


@settings(max_examples=100, deadline=None)
@given(geometries(), st.floats(0, 1, exclude_max=True), st.floats(0, 1, exclude_max=True))
def test_a_pixel_centre_lies_in_the_pixels_of_the_cell_it_maps_to(geometry: Geometry, fx: float, fy: float) -> None:
    oh, ow = geometry.original
    x, y = math.floor(fx * ow) + 0.5, math.floor(fy * oh) + 0.5  # a pixel centre
    gx, gy = geometry.to_grid(torch.tensor([[x, y, x, y]], dtype=torch.float64))[0, :2].tolist()
    row, col = int(gy), int(gx)
    x0, y0, x1, y1 = geometry.cells_to_pixels(row, col)
    slack = 1e-3  # float32 grid units
    assert x0 - slack <= x < x1 + slack and y0 - slack <= y < y1 + slack
    assert 0 <= x0 < x1 <= ow and 0 <= y0 < y1 <= oh
