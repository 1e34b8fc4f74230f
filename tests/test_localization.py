"""Localisation scores: hand-computed cases and properties (hypothesis). Boxes from pixels to grid units:
tests/test_geometry.py."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eive_audit.pipeline.metrics.localization import box_coverage, localization_scores

GRID = (8, 10)


@st.composite
def box(draw: st.DrawFn) -> list[float]:
    h, w = GRID
    x0 = draw(st.floats(0, w - 1))
    y0 = draw(st.floats(0, h - 1))
    return [x0, y0, draw(st.floats(x0 + 0.25, w)), draw(st.floats(y0 + 0.25, h))]


maps = st.lists(st.floats(0, 10, allow_nan=False), min_size=80, max_size=80).map(
    lambda v: torch.tensor(v).view(1, *GRID)
).filter(lambda m: float(m.sum()) > 1e-3)


def test_coverage_is_exact_for_cut_cells() -> None:
    # Box from x 1.5 to 3 and y 0 to 1: half of cell (0,1), all of (0,2), nothing else.
    cov = box_coverage(torch.tensor([[1.5, 0.0, 3.0, 1.0]]), (2, 4))[0]
    assert cov.tolist() == [[0.0, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


@settings(max_examples=60, deadline=None)
@given(maps, box(), box(), box())
def test_masses_lie_in_unit_interval(m: torch.Tensor, own: list[float], gt_a: list[float], gt_b: list[float]) -> None:
    scores = localization_scores(m, torch.tensor([own]), torch.tensor([0]), torch.tensor([gt_a, gt_b]))
    for name in ("mass_in_pred", "mass_in_gt", "mass_on_other_gt"):
        value = float(scores[name][0])
        assert math.isnan(value) or -1e-6 <= value <= 1 + 1e-6, name
    assert float(scores["peak_in_gt"][0]) in (0.0, 1.0)
    assert float(scores["compactness"][0]) >= 0


@settings(max_examples=60, deadline=None)
@given(maps, box(), box(), st.floats(1e-3, 1e3))
def test_scores_are_invariant_to_map_scale(m: torch.Tensor, own: list[float], gt: list[float], scale: float) -> None:
    args = (torch.tensor([own]), torch.tensor([0]), torch.tensor([gt]))
    a, b = localization_scores(m, *args), localization_scores(m * scale, *args)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(box(), st.data())
def test_one_hot_cell_inside_the_box_scores_one(gt: list[float], data: st.DataObject) -> None:
    x0, y0, x1, y1 = gt
    # A cell fully inside the box, when the box holds one.
    cells = [(r, c) for r in range(GRID[0]) for c in range(GRID[1]) if x0 <= c and c + 1 <= x1 and y0 <= r and r + 1 <= y1]
    if not cells:
        return
    r, c = data.draw(st.sampled_from(cells))
    m = torch.zeros(1, *GRID)
    m[0, r, c] = 3.0
    scores = localization_scores(m, torch.tensor([gt]), torch.tensor([0]), torch.tensor([gt]))
    assert float(scores["mass_in_gt"][0]) == 1.0
    assert float(scores["mass_in_pred"][0]) == 1.0
    assert float(scores["peak_in_gt"][0]) == 1.0
    assert float(scores["compactness"][0]) == 0.0


def test_other_gt_mass_and_missing_gt() -> None:
    m = torch.zeros(2, 4, 4)
    m[:, 0, 0], m[:, 3, 3] = 1.0, 3.0  # a quarter of the mass on GT 0, three quarters on GT 1
    gts = torch.tensor([[0.0, 0.0, 1.0, 1.0], [3.0, 3.0, 4.0, 4.0]])
    own = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 2)
    scores = localization_scores(m, own, torch.tensor([0, -1]), gts)
    assert scores["mass_in_gt"][0] == 0.25 and math.isnan(float(scores["mass_in_gt"][1]))
    assert scores["mass_on_other_gt"][0] == 0.75, "ODI: mass on other GT over mass on all GT"
    assert scores["mass_on_other_gt"][1] == 1.0, "an instance without GT: every GT is another's"
    assert math.isnan(float(localization_scores(torch.zeros(1, 4, 4), own[:1], torch.tensor([0]), gts)["mass_in_pred"][0]))
