"""The HTML report and the overlay geometry it shares with the FiftyOne push.

The report is built from a real audit (the Prefect flow, the shipped model, two explainers, a faithfulness
sample) of synthetic images made landscape and portrait, so every batch is resized *and* padded: the
overlays must undo both. Then the page is checked as text (self-contained, every part present, data
escaped) and as Chromium renders it (every image decodes).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shlex
import signal
import subprocess
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from eive_audit.pipeline.findings.clustering import crop
from eive_audit.pipeline.findings.flags import Case, InstanceFinding
from eive_audit.pipeline.geometry import Geometry
from eive_audit.pipeline.metrics.localization import localization_scores
from eive_audit.reports import views
from eive_audit.reports.html_report import (_STYLE, CAPTION_SCORES, CSP, PLOTTED_SCORES, SUGGESTED_DATASET,
                                            TOP_SPURIOUS, _card, _card_id, _cue, _cue_id, _read_image, _Review,
                                            write_report)
from eive_audit.reports.overlay import map_to_image, peak_in_crop
from eive_audit.reports.plots import HEAT_COLOURS, HEAT_SCALING, PANEL_PIXELS, PEAK_COLOUR, Panel, _score_range, overlay
from eive_audit.storage.catalog import query
from eive_audit.storage.maps import decode_map, encode_map

CHROMIUM = Path("/usr/bin/chromium")
SECOND_EXPLAINER = "test-eive-last"
TOP_FAILURES = 12
BAD_FILE = "missing<b>&.png"  # an image that does not exist, named so that its error message needs escaping

pytestmark = pytest.mark.xdist_group("report")  # one audited `run` for the module


# ---------------------------------------------------------------- geometry of map_to_image

# A 60 x 120 image resized to 40 x 80 and padded to 80 x 96 with a batch-mate; stride 8 -> a 10 x 12 grid of
# which the image covers the top-left 5 x 10 cells. One cell = 12 x 12 original pixels.
GEOMETRY = Geometry(original=(60, 120), input=(40, 80), padded=(80, 96), grid=(10, 12))


def _hot(row: int, col: int) -> np.ndarray:
    grid = np.zeros(GEOMETRY.grid, np.float32)
    grid[row, col] = 1.0
    return grid


@pytest.mark.parametrize("cell", [(0, 0), (2, 3), (4, 9)])
def test_a_hot_cell_lands_on_its_region_of_the_original_image(cell: tuple[int, int]) -> None:
    row, col = cell
    cells = map_to_image(_hot(row, col), GEOMETRY, order=0)
    assert cells.shape == (60, 120) and cells.dtype == np.float32
    ys, xs = np.nonzero(cells)
    # cell (r, c) covers original rows [12 r, 12 r + 12) and columns [12 c, 12 c + 12), nothing else
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (12 * row, 12 * row + 11, 12 * col, 12 * col + 11)
    assert np.all(cells[ys, xs] == 1.0)

    smooth = map_to_image(_hot(row, col), GEOMETRY)
    peak_y, peak_x = np.unravel_index(smooth.argmax(), smooth.shape)
    assert 12 * row <= peak_y < 12 * row + 12 and 12 * col <= peak_x < 12 * col + 12
    assert smooth[cells == 0].max() < 1.0, "bilinear spreads at most into the neighbours"


def test_an_interior_hot_cell_is_centred_on_its_region() -> None:
    smooth = map_to_image(_hot(2, 3), GEOMETRY)
    ys, xs = np.mgrid[:60, :120] + 0.5  # pixel centres
    weights = smooth / smooth.sum()
    # the tent is symmetric about the cell centre, (2.5, 3.5) cells = (30, 42) pixels
    assert (weights * ys).sum() == pytest.approx(30.0, abs=0.05)
    assert (weights * xs).sum() == pytest.approx(42.0, abs=0.05)


def test_padding_cells_never_reach_the_image() -> None:
    padding = np.zeros(GEOMETRY.grid, np.float32)
    padding[5:, :] = 1.0  # rows below the image
    padding[:, 10:] = 1.0  # columns right of it
    for order in (0, 1):
        assert not map_to_image(padding, GEOMETRY, order=order).any()


def test_stored_bytes_and_arrays_give_the_same_overlay() -> None:
    grid = np.random.default_rng(0).random(GEOMETRY.grid).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(map_to_image(encode_map(grid), GEOMETRY), map_to_image(grid, GEOMETRY))
    with pytest.raises(ValueError, match="grid"):
        map_to_image(grid, replace(GEOMETRY, grid=(12, 10)))
    with pytest.raises(ValueError, match="exceed"):
        map_to_image(grid, replace(GEOMETRY, input=(90, 80)))


def _inside(shape: tuple[int, int], box: list[float], pixels_per_unit: int = 1) -> np.ndarray:
    """Pixels of a rendered map whose centres fall inside an xyxy box given in units of 1 / pixels_per_unit."""
    ys, xs = (np.mgrid[: shape[0], : shape[1]] + 0.5) / pixels_per_unit
    x0, y0, x1, y1 = box
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def test_overlay_and_scores_read_a_map_with_the_same_geometry() -> None:
    """The pipeline's mass in a box (grid units via Geometry.to_grid) equals the overlay's mass in that box."""
    grid = torch.rand(GEOMETRY.grid) * (torch.arange(12) < 10) * (torch.arange(10) < 5)[:, None]
    box = [24.0, 12.0, 84.0, 48.0]  # on cell edges: 2..7 x 1..4 cells, so pixel counting is exact
    to_grid = GEOMETRY.to_grid(torch.tensor([box]))
    expected = localization_scores(grid[None], to_grid, torch.tensor([0]), to_grid)["mass_in_gt"].item()
    image_map = map_to_image(grid.numpy(), GEOMETRY, order=0)
    assert image_map[_inside(image_map.shape, box)].sum() / image_map.sum() == pytest.approx(expected, rel=1e-5)


def test_a_large_image_is_read_for_a_card_at_panel_size(tmp_path: Path) -> None:
    """A card shows at most PANEL_PIXELS a side: a 4000 x 3000 photo is decoded that small (the report once
    decoded each card's image whole, and drew its maps at that size), its map drawn on the same raster and its
    boxes still in original pixels."""
    pixels = np.zeros((3000, 4000, 3), np.uint8)
    pixels[:, 2000:] = 255
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=90)
    image = _read_image(str(tmp_path / "big.jpg"), tmp_path)
    assert image is not None and image.shape == (180, PANEL_PIXELS, 3)
    assert image[:, :100].max() < 20 and image[:, -100:].min() > 235, "the same picture, smaller"
    grid = np.zeros((4, 4), np.float32)
    grid[1, 1] = 1.0
    row = {"file_path": str(tmp_path / "big.jpg"), "width": 4000, "height": 3000, "input_height": 96,
           "input_width": 128, "padded_height": 128, "padded_width": 128, "grid_h": 4, "grid_w": 4,
           "map": encode_map(grid), "explainer": "eive", "instance_id": "1-q0", "label_name": "thing",
           "outcome": "tp", "score": 0.9, "iou": 0.8, "pred_x0": 1000.0, "pred_y0": 750.0, "pred_x1": 2000.0,
           "pred_y1": 1500.0, "gt_x0": 1000.0, "gt_y0": 750.0, "gt_x1": 2000.0, "gt_y1": 1500.0,
           **{score: None for score in CAPTION_SCORES}}
    card = _card([row], tmp_path)
    assert 'data-instance="1-q0"' in card and "image unavailable" not in card


def _png_pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_a_card_shows_the_plain_image_beside_each_map() -> None:
    """However strong a map, the object stays in view: the first panel is the image untouched, the next the
    same image under the map."""
    image = np.zeros((60, 80, 3), np.uint8)
    image[...] = (0, 200, 0)
    pixels = _png_pixels(overlay(image, [Panel("eive", np.ones((60, 80), np.float32))], [10, 10, 30, 30], None))
    panel = PANEL_PIXELS * PANEL_PIXELS * 3 // 4  # pixels of one 4:3 panel
    plain = (np.abs(pixels - (0, 200, 0)).max(-1) <= 2).sum()
    assert plain > 0.9 * panel, "the plain image panel"
    assert plain < 1.1 * panel, "and only one: the map panel is not the plain image"


def test_score_axes_start_at_zero_and_reach_one() -> None:
    assert _score_range(np.array([0.42, 0.61]))[0] == 0.0 and _score_range(np.array([0.42, 0.61]))[1] >= 1.0
    low, high = _score_range(np.array([-0.2, 0.5]))
    assert low < -0.2 and high >= 1.0, "a negative value stays in view"


# A 192 x 128 picture audited at 128 x 85 (padded 128 x 128, a 16 x 16 grid: 12 x 12 original pixels a cell),
# whose crops are cut from it decoded at 128 x 85, as pipeline.findings does with the shipped model.
CROP_GEOMETRY = Geometry(original=(128, 192), input=(85, 128), padded=(128, 128), grid=(16, 16))


@pytest.mark.parametrize("cell, span", [((5, 6), 1), ((4, 7), 3), ((0, 6), 1), ((5, 0), 2), ((9, 6), 1),
                                        ((5, 15), 1)], ids=["inside", "wide", "top", "left", "bottom", "right"])
def test_the_peak_mark_lands_on_the_peak_window_of_a_real_crop(cell: tuple[int, int], span: int) -> None:
    """Where the report marks the peak in a crop made by the findings' own `crop`, also when the image border
    cut the crop short: within one picture pixel (4 crop pixels) of the peak window's centre."""
    finding = InstanceFinding(0.5, 0.5, True, False, False)
    finding.set_peak(CROP_GEOMETRY, cell, span)
    picture = torch.zeros((3, 85, 128), dtype=torch.uint8)
    png = crop(picture, Case({}, finding, CROP_GEOMETRY, torch.zeros(1), 0))
    with Image.open(io.BytesIO(png)) as image:
        size = image.size
    x0, y0, _, _ = CROP_GEOMETRY.cells_to_pixels(*cell, radius=1, span=span, raster=(85, 128))
    px0, py0, px1, py1 = CROP_GEOMETRY.cells_to_pixels(*cell, span=span, raster=(85, 128))
    expected = (4 * ((px0 + px1) / 2 - x0), 4 * ((py0 + py1) / 2 - y0))
    assert peak_in_crop(size, CROP_GEOMETRY, finding.peak_xy) == pytest.approx(expected, abs=4)


# ---------------------------------------------------------------- a real run and its report


def _landscape_and_portrait(synth: Path, out: Path, n: int = 8) -> tuple[Path, Path]:
    """The first n synthetic val images with a grey band added, right (even) or below (odd), boxes unchanged,
    plus one entry whose file is missing; returns (annotation json, image root)."""
    data = json.loads((synth / "annotations" / "val.json").read_text())
    images = sorted(data["images"], key=lambda im: im["id"])[:n]
    root = out / "images"
    root.mkdir(parents=True)
    for k, entry in enumerate(images):
        with Image.open(synth / "images" / "val" / entry["file_name"]) as source:
            w, h = source.size
            size = (w + w // 2, h) if k % 2 == 0 else (w, h + h // 2)
            canvas = Image.new("RGB", size, (128, 128, 128))
            canvas.paste(source.convert("RGB"), (0, 0))
        canvas.save(root / entry["file_name"])
        entry["width"], entry["height"] = size
    ids = {entry["id"] for entry in images}
    missing = {"id": max(ids) + 1, "file_name": BAD_FILE, "width": 128, "height": 128}
    ann = out / "val.json"
    ann.write_text(json.dumps({"images": [*images, missing], "categories": data["categories"],
                               "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
    return ann, root


def _register_second_explainer() -> None:
    """EIVE with last-layer fusion under another name, so the run has two explainers to show side by side."""
    from eive_audit.explainers import available, register
    from eive_audit.explainers.eive import EIVE
    from eive_audit.pipeline.config import EiveSettings

    if SECOND_EXPLAINER not in available():
        class LastLayer(EIVE):
            def __init__(self) -> None:
                super().__init__(EiveSettings(fusion="last"))

        register(SECOND_EXPLAINER)(LastLayer)


@pytest.fixture(scope="module")
def run(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """(store, run id, report path) of a real audit of landscape and portrait images."""
    from eive_audit.flows.audit import audit
    from eive_audit.pipeline.config import AuditConfig

    work = tmp_path_factory.mktemp("report_run")
    ann, images = _landscape_and_portrait(synth, work)
    _register_second_explainer()
    store = work / "store"
    # report=False: the flow would write its own report; this test writes one with an extra section.
    summary = audit(AuditConfig(images=images, coco=ann, out=store, explainers=("eive", SECOND_EXPLAINER),
                                faithfulness={"instances": "sample:5", "steps": 4}, device="cpu",
                                review={"report": False}))
    extra = [("Findings <draft>", '<p id="extra-probe">a later module\'s section</p>')]
    report = write_report(store, summary["run_id"], work / "report.html", TOP_FAILURES, extra_sections=extra)
    return store, summary["run_id"], report


class _Tags(HTMLParser):
    """Every start tag as (tag, attributes), plus the text and every link as (href, its text), for checks that
    do not depend on formatting."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.links: list[tuple[str, str]] = []
        self._link: list[str] | None = None  # href and text of the <a> being read
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag == "a" and "href" in self.tags[-1][1]:
            self._link = [self.tags[-1][1]["href"]]

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._link is not None:
            self.links.append((self._link[0], "".join(self._link[1:])))
            self._link = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._link is not None:
            self._link.append(data)

    def plain(self) -> str:
        """The text as a reader sees it (entities decoded, tags gone)."""
        return "".join(self.text)

    def by_id(self) -> dict[str, tuple[str, dict[str, str]]]:
        return {a["id"]: (t, a) for t, a in self.tags if "id" in a}

    def count(self, tag: str, css_class: str) -> int:
        return sum(t == tag and css_class in a.get("class", "").split() for t, a in self.tags)


def _section(page: str, section_id: str) -> str:
    start = page.index(f'<section id="{section_id}"')
    return page[start:page.index("</section>", start)]


def _expected_plots(store: Path, run_id: str) -> int:
    counts = query(store, f"SELECT {', '.join(f'count({s}) AS {s}' for s in PLOTTED_SCORES)} FROM instances "
                          "WHERE run_id = ?", [run_id]).to_pylist()[0]
    return sum(n > 0 for n in counts.values())


def test_the_report_is_self_contained_and_has_every_part(run: tuple[Path, str, Path]) -> None:
    store, run_id, path = run
    page = path.read_text()
    tags = _Tags(page)
    links = [a[k] for _, a in tags.tags for k in ("src", "href") if k in a]
    assert links and all(link.startswith(("data:image/png;base64,", "#")) for link in links), "nothing external"
    assert "http://" not in page and "https://" not in page
    assert any(t == "meta" and a.get("content") == CSP for t, a in tags.tags)

    assert _expected_plots(store, run_id) == len(PLOTTED_SCORES), "the run fills every plotted score"
    assert tags.count("img", "plot") == len(PLOTTED_SCORES)
    plots = _section(page, "plots")
    assert _Tags(plots).count("img", "plot") == len(PLOTTED_SCORES), "the plots are in their section"

    gallery = _section(page, "failures")
    cards = _Tags(gallery)
    shown = [a["data-instance"] for t, a in cards.tags if t == "figure" and "failure" in a.get("class", "")]
    assert cards.count("img", "overlay") == len(shown) == TOP_FAILURES

    def ranked(where: str, order: str, limit: int) -> list[str]:
        return query(store, f"SELECT instance_id FROM instances WHERE run_id = ? AND explainer = 'eive' AND {where} "
                            f"ORDER BY {order}, instance_id LIMIT {limit}", [run_id]).column(0).to_pylist()

    # a third misses (least mass on their box), a third false positives (most confident), the rest correct
    # detections with the least mass on their object, in that order
    misses = ranked("outcome = 'fn'", "mass_in_gt", TOP_FAILURES // 3)
    false_positives = ranked("outcome IN ('fp', 'dup')", "score DESC", TOP_FAILURES // 3)
    assert len(misses) == len(false_positives) == TOP_FAILURES // 3, "the run has enough of each"
    correct = ranked("outcome = 'tp'", "mass_in_gt", TOP_FAILURES - 2 * (TOP_FAILURES // 3))
    assert shown == misses + false_positives + correct
    assert gallery.count(f"<th>{SECOND_EXPLAINER}</th>") == len(shown), "every card shows both explainers"
    assert "least mass_in_gt" in gallery, "the page says how cards were chosen"

    errors = _section(page, "errors")
    assert "missing&lt;b&gt;&amp;.png" in errors and BAD_FILE not in page, "error text is escaped"
    assert "Showing all 1 rows" in errors
    assert "sample:5" in _section(page, "config")
    summary = _section(page, "summary")
    assert "forward" in summary and "p95" in summary and SECOND_EXPLAINER in summary

    extra = _section(page, "extra-findings-draft")
    assert "Findings &lt;draft&gt;" in extra and '<p id="extra-probe">' in extra


def test_overlays_agree_with_the_stored_scores_on_padded_batches(run: tuple[Path, str, Path]) -> None:
    """For every instance, the overlay's mass inside its GT box matches the audit's own mass_in_gt."""
    store, run_id, _ = run
    rows = query(store, """
        SELECT i.mass_in_gt, i.gt_x0, i.gt_y0, i.gt_x1, i.gt_y1, m.grid_h, m.grid_w, m."map",
               g.height, g.width, g.input_height, g.input_width, g.padded_height, g.padded_width
        FROM instances i
        JOIN maps m ON m.run_id = i.run_id AND m.instance_id = i.instance_id AND m.explainer = i.explainer
        JOIN images g ON g.run_id = i.run_id AND g.image_id = i.image_id
        WHERE i.run_id = ? AND i.mass_in_gt IS NOT NULL""", [run_id]).to_pylist()
    assert len(rows) > 20
    assert {(r["input_height"], r["input_width"], r["padded_height"], r["padded_width"]) for r in rows} == {
        (85, 128, 128, 128), (128, 85, 128, 128)}, "every image resized and padded"
    errors = []
    for r in rows:
        # Rendered 4x finer than the image (image_size only sets the scale), so counting pixel centres in the
        # box approximates exact cell fractions to within a quarter-pixel rim. The audit normalises by the
        # grid's sum (a border cell half in the padding counts whole), so integrate rather than renormalise.
        grid, size = (r["grid_h"], r["grid_w"]), (4 * r["height"], 4 * r["width"])
        geometry = Geometry(size, (r["input_height"], r["input_width"]), (r["padded_height"], r["padded_width"]), grid)
        image_map = map_to_image(r["map"], geometry, order=0)
        cells_per_pixel = (grid[0] * r["input_height"] / (r["padded_height"] * size[0])
                           * grid[1] * r["input_width"] / (r["padded_width"] * size[1]))
        in_box = image_map[_inside(size, [r["gt_x0"], r["gt_y0"], r["gt_x1"], r["gt_y1"]], 4)].sum() * cells_per_pixel
        errors.append(abs(in_box / decode_map(r["map"], *grid).sum() - r["mass_in_gt"]))
    # a half-cell slip (6 px) or a map stretched over the padding would be off by far more
    assert max(errors) < 0.012, sorted(errors)[-5:]


def test_each_most_spurious_row_links_to_a_card_of_its_instance(run: tuple[Path, str, Path]) -> None:
    """The table's instances, in the store's order, each linking to an element of the page that is the card
    of that instance (in the gallery, or in the findings when the gallery has none); every id unique."""
    store, run_id, path = run
    page = path.read_text()
    expected = query(store, "SELECT instance_id FROM instances WHERE run_id = ? AND spurious_score IS NOT NULL "
                            "ORDER BY spurious_score DESC, instance_id LIMIT ?", [run_id, TOP_SPURIOUS]).column(0)
    expected = expected.to_pylist()
    assert len(expected) == TOP_SPURIOUS, "the run fills the table"
    findings = _section(page, "findings")
    table = findings[findings.index("<h3>Most spurious instances</h3>"):]
    links = _Tags(table[:table.index("</table>")]).links
    assert [text for _, text in links] == expected
    tags = _Tags(page)
    ids = [a["id"] for _, a in tags.tags if "id" in a]
    assert len(ids) == len(set(ids)), "ids are unique"
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_.:-]*", i) for i in ids), "ids are plain"
    for href, instance_id in links:
        tag, attrs = tags.by_id()[href.removeprefix("#")]
        assert tag == "figure" and "failure" in attrs["class"].split() and attrs["data-instance"] == instance_id

    def cards(section: str) -> list[str]:
        return [a["data-instance"] for t, a in _Tags(_section(page, section)).tags
                if t == "figure" and "failure" in a.get("class", "").split()]

    in_gallery, in_findings = cards("failures"), cards("findings")
    assert set(expected) == set(in_findings) | (set(expected) & set(in_gallery)), "a card for every row"
    assert in_findings and not set(in_findings) & set(in_gallery), "each drawn once"
    assert _card_id("a b\"<x>") != _card_id("a_b__x_") and re.fullmatch(r"card-[\w.:-]+", _card_id("a b\"<x>"))


def _cue_block(page: str, cue_id: str) -> str:
    findings = _section(page, "findings")
    start = findings.index(f'id="{_cue_id(cue_id)}"')
    ends = [i for i in (findings.find('<div class="finding ', start), findings.find("<h3>", start)) if i >= 0]
    return findings[start:min(ends)]


def test_cue_crops_carry_their_instance_ids_and_a_peak_mark(run: tuple[Path, str, Path]) -> None:
    """Every exemplar crop is captioned with its instance id and shows the stored crop with a ring (and ticks)
    centred where `peak_in_crop` puts the instance's peak, the peak itself left visible."""
    store, run_id, path = run
    page = path.read_text()
    cues = query(store, "SELECT cue_id, explainer, exemplar_ids, exemplar_crops FROM findings WHERE run_id = ?",
                 [run_id]).to_pylist()
    assert cues, "the run has candidate cues"
    for cue in cues:
        block = _Tags(_cue_block(page, cue["cue_id"]))
        figures = [a["data-instance"] for t, a in block.tags if t == "figure" and a.get("class") == "exemplar"]
        assert figures == cue["exemplar_ids"] and all(i in block.plain() for i in figures), "captioned"
        shown = [a["src"] for t, a in block.tags if t == "img" and a.get("class") == "crop"]
        for instance_id, stored, src in zip(cue["exemplar_ids"], cue["exemplar_crops"], shown, strict=True):
            row = query(store, "SELECT i.peak_x, i.peak_y, g.*, m.grid_h, m.grid_w FROM instances i "
                               "JOIN images g USING (run_id, image_id) JOIN maps m USING (run_id, instance_id, explainer) "
                               "WHERE i.run_id = ? AND i.instance_id = ? AND i.explainer = ?",
                        [run_id, instance_id, cue["explainer"]]).to_pylist()[0]
            before, after = _png_pixels(stored), _png_pixels(base64.b64decode(src.split(",", 1)[1]))
            x, y = (round(v) for v in peak_in_crop(before.shape[1::-1], Geometry.from_image_row(
                row, (row["grid_h"], row["grid_w"])), (row["peak_x"], row["peak_y"])))
            assert after.shape == before.shape and (after[y, x] == before[y, x]).all(), "the peak stays visible"
            red = (after == np.array(tuple(bytes.fromhex(PEAK_COLOUR[1:])))).all(-1)
            changed = (after != before).any(-1)
            assert changed.mean() < 0.4, "the mark leaves most of the crop as stored"
            assert red.any(), "the mark is drawn"
            # the ring and its ticks are symmetric about the peak, unless the crop's edge cuts one side short
            for centre, drawn, length in ((x, np.nonzero(red)[1], before.shape[1]), (y, np.nonzero(red)[0],
                                                                                      before.shape[0])):
                cut = drawn.min() == 0 or drawn.max() == length - 1
                assert cut or abs((drawn.min() + drawn.max()) / 2 - centre) <= 2, (instance_id, centre)


def test_confirmed_and_unconfirmed_cues_look_different_and_the_drop_is_explained(run: tuple[Path, str, Path]
                                                                                 ) -> None:
    store, run_id, path = run
    page = path.read_text()
    cues = query(store, "SELECT * FROM findings WHERE run_id = ?", [run_id]).to_pylist()
    for cue in cues:  # each block on the page is styled as its row says
        kind = "confirmed" if cue["confirmed"] else "unconfirmed"
        assert f'<div class="finding {kind}" id="{_cue_id(cue["cue_id"])}">' in page
    review = _Review(store, run_id, None)
    html_of = {(confirmed, drop): _cue({**cues[0], "confirmed": confirmed, "verification_drop": drop}, {}, {}, 0.5,
                                       review)
               for confirmed, drop in ((True, 0.7), (False, 0.1), (False, -0.2), (False, None))}
    classes = {key: _Tags(part).tags[0][1]["class"] for key, part in html_of.items()}
    assert classes[(True, 0.7)] == "finding confirmed"
    assert {classes[k] for k in html_of if not k[0]} == {"finding unconfirmed"}
    words = {key: html.unescape(part) for key, part in html_of.items()}
    assert "raised" in words[(False, -0.2)] and "not the evidence" in words[(False, -0.2)]
    assert "cut its members' scores by 70%" in words[(True, 0.7)] and "needs the region" in words[(True, 0.7)]
    assert "below the 0.50" in words[(False, 0.1)] and "not verified" in words[(False, None)]
    rules = {selector.strip(): body for selector, body in re.findall(r"([.\w#, -]+?)\s*\{([^}]*)\}", _STYLE)}
    assert rules[".finding.confirmed"] != rules[".finding.unconfirmed"], "the two look different"
    assert rules[".badge.confirmed"] != rules[".badge.unconfirmed"]
    intro = _Tags(_section(page, "findings")).plain()
    assert "a negative drop means blurring raised the score: the region is not the evidence" in intro


def test_every_section_names_a_fiftyone_view_and_the_commands_to_open_it(run: tuple[Path, str, Path]) -> None:
    """The run was not pushed: each section says how to push it, then names its views with the command that
    opens each (on `<dataset>-instances`, and on the image dataset where the push saves it there too)."""
    store, run_id, path = run
    page = path.read_text()
    push = f"eive-audit push --store {shlex.quote(str(store))} --run {run_id} --dataset {SUGGESTED_DATASET}"
    every_map = [(views.explainer_view(run_id, e), False) for e in ("eive", SECOND_EXPLAINER)]
    cues = query(store, "SELECT cue_id FROM findings WHERE run_id = ?", [run_id]).column(0).to_pylist()
    expected = {
        "summary": every_map, "config": every_map, "errors": every_map,
        "findings": [(views.view_name(run_id, views.TP_OFF_OBJECT), True),
                     (views.view_name(run_id, views.FP_BACKGROUND), True),
                     *((views.cue_view(run_id, c), True) for c in cues)],
        "failures": [(views.view_name(run_id, v), True) for v in (views.MISSED, views.FP_BACKGROUND,
                                                                  views.TP_OFF_OBJECT)],
        "plots": [(views.view_name(run_id, views.LOWEST_INSERTION_AUC), True)],
    }
    for section_id, named in expected.items():
        text = _Tags(_section(page, section_id)).plain()
        assert push in text, section_id
        for view, on_images in named:
            assert f"view {view}: {views.open_command(f'{SUGGESTED_DATASET}-instances', view)}" in text, view
            assert (views.open_command(SUGGESTED_DATASET, view) in text) == on_images, view
    pushed = _Tags(_Review(store, run_id, "team <review>").block([("v 1", "things", True)])).plain()
    assert "eive-audit push" not in pushed, "a pushed run needs no push"
    assert "eive-audit app --dataset 'team <review>-instances' --view 'v 1'" in pushed
    assert "eive-audit app --dataset 'team <review>' --view 'v 1'" in pushed


def test_one_colour_bar_keys_every_map_and_states_the_scaling(run: tuple[Path, str, Path]) -> None:
    page = run[2].read_text()
    bars = [a["src"] for t, a in _Tags(page).tags if t == "img" and "colourbar" in a.get("class", "").split()]
    assert len(bars) == 1
    header = page[page.index('<header class="top">'):page.index("</header>")]
    assert bars[0] in header and HEAT_SCALING in _Tags(header).plain(), "the bar and its scaling, side by side"
    pixels = _png_pixels(base64.b64decode(bars[0].split(",", 1)[1])).reshape(-1, 3)
    for end in (0.0, 1.0):  # both ends of the colour map are on the bar
        colour = np.array(colormaps[HEAT_COLOURS](end)[:3]) * 255
        assert np.abs(pixels - colour).max(-1).min() <= 6, end


def test_an_unknown_run_is_refused(run: tuple[Path, str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no run"):
        write_report(run[0], "nope", tmp_path / "r.html")
    assert not list(tmp_path.iterdir()), "nothing written"


# ---------------------------------------------------------------- as a browser renders it

_PROBE = ("<script>addEventListener('load', () => { const all = [...document.images]; "
          "document.body.dataset.images = all.length; "
          "document.body.dataset.decoded = all.filter(i => i.complete && i.naturalWidth > 0).length; });</script>")


def _chromium(*args: str, profile: Path, timeout: float = 60) -> str:
    """Run headless Chromium and return its stdout; its whole process group is killed however it ends."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    proc = subprocess.Popen([str(CHROMIUM), *flags, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0 or out, f"chromium exited {proc.returncode}"
    return out


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless check needs Debian's chromium at /usr/bin/chromium "
                                                  "(apt-get install chromium; the Makefile installs it for CI)")
def test_chromium_renders_every_image(run: tuple[Path, str, Path], tmp_path: Path) -> None:
    _, _, path = run
    page = path.read_text()
    # The report runs no script; this copy lets one count decoded images, and nothing else.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace(CSP, CSP + "; script-src 'unsafe-inline'").replace("</body>", _PROBE + "</body>"))
    dom = _Tags(_chromium("--dump-dom", probe.as_uri(), profile=tmp_path / "profile"))
    body = next(a for t, a in dom.tags if t == "body")
    n_images = sum(t == "img" for t, _ in _Tags(page).tags)
    assert body.get("data-images") == str(n_images) and body.get("data-decoded") == str(n_images)
    # the gallery's cards, and the cards of the most spurious instances the gallery lacks
    spurious_cards = _Tags(_section(page, "findings")).count("figure", "failure")
    assert dom.count("img", "plot") == len(PLOTTED_SCORES)
    assert dom.count("figure", "failure") == TOP_FAILURES + spurious_cards

    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2400", path.as_uri(), profile=tmp_path / "profile")
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot shows content, not a blank page"
    _screenshot_parts(page, tmp_path)


def _screenshot_parts(page: str, out: Path) -> None:
    """A screenshot of the first gallery card above the findings section (out/card-and-findings.png), for a
    reviewer to look at. Headless Chromium cannot shoot a scrolled page, so both parts are shown on a page of
    the report's own head and header (its style, colour bar and scaling); one page, so one more launch."""
    head, header = page[:page.index("<body>")], page[page.index('<header class="top">'):page.index("</header>")]
    gallery = _section(page, "failures")
    card = gallery[gallery.index('<figure class="failure'):]
    parts = out / "card-and-findings.html"
    parts.write_text(f"{head}<body>{header}</header><div class=\"grid\">{card[:card.index('</figure>')]}</figure>"
                     f"</div>{_section(page, 'findings')}</section></body></html>")
    shot = out / "card-and-findings.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2000", parts.as_uri(), profile=out / "profile")
    pixels = _png_pixels(shot.read_bytes()).reshape(-1, 3)
    # the colour bar's bright end, and the red of the peak marks (the card's, the cue crops')
    for colour in (np.array(colormaps[HEAT_COLOURS](1.0)[:3]) * 255, np.array(tuple(bytes.fromhex(PEAK_COLOUR[1:])))):
        assert np.abs(pixels - colour).max(-1).min() <= 8, colour
