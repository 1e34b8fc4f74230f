"""Figures of the HTML report, rendered to PNG bytes with matplotlib's Agg canvas.

Figures are built as `matplotlib.figure.Figure` objects, never through pyplot: pyplot keeps every figure
in a global registry until it is closed, so a report drawing dozens of them (or two reports in two
threads) would leak or collide. A bare Figure has no global state and is freed with its last reference.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, Patch, Rectangle
from PIL import Image, ImageDraw

# One fixed colour per outcome, so every figure of a report reads the same way.
OUTCOME_COLOURS = {"tp": "#2e7d32", "fp": "#c62828", "dup": "#ef6c00", "crowd": "#757575", "fn": "#1565c0",
                   "det": "#6a1b9a", "correct": "#2e7d32", "wrong": "#c62828", "missed": "#1565c0"}
PRED_COLOUR, GT_COLOUR, PEAK_COLOUR = "#00e5ff", "#76ff03", "#ff1744"
HEAT_COLOURS = "inferno"
# What a colour of a map panel means: each map is divided by its own maximum (maps of different explainers, and of
# different instances, come in unrelated units), so a colour says how close a point is to that map's peak.
HEAT_SCALING = ("each map scaled to its own maximum: 0 = no saliency, 1 = the map's peak (maps of different "
                "explainers or instances are not on one scale)")
_DPI = 100
PANEL_INCHES = 2.4  # the longer side of an overlay panel (the image, then one per explainer): two one-explainer
# cards per page row
# An overlay panel's longer side in pixels: an image or map drawn finer than this is only resampled away.
PANEL_PIXELS = round(PANEL_INCHES * _DPI)


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def score_distribution(rows: pa.Table, score: str) -> bytes | None:
    """Box plots of one score per class, one box per outcome, one panel per explainer; None if all null.

    rows: columns `explainer`, `label_name`, `outcome` and `score` (one row per instance and explainer).
    """
    values = rows.column(score).to_numpy(zero_copy_only=False).astype(float)
    if np.isnan(values).all():
        return None
    explainers, labels, outcomes = (rows.column(name).to_numpy(zero_copy_only=False)
                                    for name in ("explainer", "label_name", "outcome"))
    present = ~np.isnan(values)
    classes = sorted(set(labels[present]))
    kinds = [k for k in OUTCOME_COLOURS if k in set(outcomes[present])]
    panels = sorted(set(explainers))
    width = 0.8 / len(kinds)
    jitter = np.random.default_rng(0)  # fixed: the same store always renders the same figure
    # 5.8 in (two figures per row of the page) unless many classes need room; capped for 80-class datasets.
    figure = Figure(figsize=(min(14.0, max(5.8, 0.3 * len(classes) * len(kinds) + 1.5)), 2.1 * len(panels) + 0.4),
                    layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for ax, explainer in zip(axes, panels):
        for k, kind in enumerate(kinds):
            groups = [values[present & (explainers == explainer) & (labels == c) & (outcomes == kind)] for c in classes]
            positions = [i - 0.4 + width * (k + 0.5) for i, group in enumerate(groups) if len(group)]
            groups = [group for group in groups if len(group)]
            if not groups:
                continue
            boxes = ax.boxplot(groups, positions=positions, widths=width * 0.85, patch_artist=True, showfliers=False,
                               manage_ticks=False)
            for patch in boxes["boxes"]:
                patch.set(facecolor=OUTCOME_COLOURS[kind], alpha=0.35)
            # every value as a dot too: a class with a handful of instances is otherwise just a flat line
            sizes = [len(group) for group in groups]
            xs = np.repeat(positions, sizes) + jitter.uniform(-0.25, 0.25, sum(sizes)) * width
            ax.scatter(xs, np.concatenate(groups), s=7, color=OUTCOME_COLOURS[kind], edgecolors="none", zorder=3)
        ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 8 else 0, fontsize=8)
        ax.set_ylabel(score)
        ax.set_ylim(*_score_range(values[present]))
        ax.set_title(f"{score} by class and outcome ({explainer})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    figure.legend(handles=[Patch(facecolor=OUTCOME_COLOURS[k], alpha=0.6, label=k) for k in kinds],
                  loc="outside upper center", fontsize=8, ncols=len(kinds), frameon=False)
    return _png(figure)


def _score_range(values: np.ndarray) -> tuple[float, float]:
    """y limits from 0 (or below, for a negative value) to at least 1: the scores live in [0, 1], and an axis
    starting at the lowest value would make a small spread look like a large one."""
    low, high = min(0.0, float(values.min())), max(1.0, float(values.max()))
    pad = 0.03 * (high - low)
    return low - (pad if low < 0 else 0.0), high + pad


@dataclass(frozen=True)
class Panel:
    """One explainer's map of an instance, already laid on the image's pixels (reports.overlay)."""

    explainer: str
    heat: np.ndarray  # float [h, w] on the image's raster; negative values are not shown
    peak: tuple[float, float] | None = None  # the findings' peak (x, y; the instances' peak_x, peak_y), if any


Box = Sequence[float]  # xyxy in original-image pixels


def _blend(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """RGB float image with the heat, scaled to [0, 1] by its maximum (HEAT_SCALING), laid over it in the
    HEAT_COLOURS colour map.

    Alpha grows with the square root of the heat, up to 0.75, so the map shows where it is strong and the
    image stays visible through it (the plain image is beside it as well).
    """
    positive = np.clip(heat, 0, None)  # signed maps (CDAM) show their positive evidence only
    peak = float(positive.max())
    norm = positive / peak if peak > 0 else positive
    alpha = 0.75 * np.sqrt(norm)[..., None]
    return (1 - alpha) * (image[..., :3] / 255.0) + alpha * colormaps[HEAT_COLOURS](norm)[..., :3]


def overlay(image: np.ndarray, panels: Sequence[Panel], pred_box: Box | None, gt_box: Box | None,
            pred_label: str = "predicted box", size: tuple[int, int] | None = None, gt_label: str = "GT box") -> bytes:
    """The uint8 RGB image as it is, then with each panel's map over it, side by side, both boxes on each and
    a panel's findings peak ringed; PNG bytes. The plain image comes first so the object a map explains is
    seen whole, however strong the map over it.

    pred_label names the explained query's box in the legend (for a miss it is the best-overlapping query's);
    no pred_box draws none (a classifier's box is the whole image: a frame round the panel says nothing).
    gt_label names the GT box (a classifier's: the object box of the image's class).
    size: the original image's (H, W), which the boxes are in, when `image` (and each heat map, on the same
    raster) is a smaller copy of it (at most PANEL_PIXELS a side is ever shown); by default the image's own.
    Image and map are drawn with extent (0, W, H, 0): original pixel i spans [i, i + 1], the continuous
    coordinates the boxes are stored in, so nothing is off by half a pixel. Axes are placed by hand (no layout
    engine): every size is known, and the layout pass would double the cost of the gallery.
    """
    height, width = size or image.shape[:2]
    scale = PANEL_INCHES / max(height, width)  # inches per original pixel
    panel_w, panel_h, margin, gap, title, legend_band = width * scale, height * scale, 0.05, 0.1, 0.22, 0.3
    shown = [("image", image[..., :3] / 255.0, None)] + [(p.explainer, _blend(image, p.heat), p.peak) for p in panels]
    fig_w, fig_h = 2 * margin + len(shown) * panel_w + (len(shown) - 1) * gap, title + panel_h + legend_band
    figure = Figure(figsize=(fig_w, fig_h))
    # One axes for the row, each panel `step` original pixels right of the last: an axes per panel (each with its
    # title laid out) made the gallery twice as slow to draw.
    ax = figure.add_axes((margin / fig_w, legend_band / fig_h, 1 - 2 * margin / fig_w, panel_h / fig_h))
    step = width + gap / scale
    boxes = ([(pred_box, PRED_COLOUR, "-")] if pred_box is not None else []) + (
        [(gt_box, GT_COLOUR, "--")] if gt_box is not None else [])
    for i, (name, pixels, peak) in enumerate(shown):
        left = i * step
        ax.imshow(pixels, extent=(left, left + width, height, 0))
        marks = [Rectangle((left + x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linestyle=style,
                           linewidth=1.6) for (x0, y0, x1, y1), colour, style in boxes]
        if peak is not None:
            marks.append(Circle((left + peak[0], peak[1]), 0.06 * max(width, height), fill=False,
                                edgecolor=PEAK_COLOUR, linewidth=1.8))
        inside = Rectangle((left, 0), width, height, transform=ax.transData)  # a mark stays on its panel
        for mark in marks:
            ax.add_patch(mark)
            mark.set_clip_path(inside)
        ax.annotate(name, (left + width / 2, 0), xytext=(0, 3), textcoords="offset points", ha="center",
                    va="bottom", fontsize=8, annotation_clip=False)
    ax.set_xlim(0, len(shown) * step - gap / scale)
    ax.set_ylim(height, 0)
    ax.set_aspect("auto")  # the axes already has the row's shape
    ax.set_axis_off()
    handles = [Line2D([], [], color=PRED_COLOUR, lw=2, label=pred_label)] if pred_box is not None else []
    if gt_box is not None:
        handles.append(Line2D([], [], color=GT_COLOUR, lw=2, ls="--", label=gt_label))
    if any(peak is not None for _, _, peak in shown):
        handles.append(Line2D([], [], color=PEAK_COLOUR, lw=0, marker="o", mfc="none", label="findings' peak"))
    if handles:
        figure.legend(handles=handles, loc="lower center", ncols=len(handles), fontsize=7, frameon=False,
                      borderaxespad=0.1)
    return _png(figure)


def colour_bar() -> bytes:
    """The key to every map panel of the report: HEAT_COLOURS from 0 to each map's own maximum; PNG bytes."""
    figure = Figure(figsize=(3.4, 0.72))
    ax = figure.add_axes((0.05, 0.62, 0.9, 0.3))
    figure.colorbar(ScalarMappable(Normalize(0, 1), HEAT_COLOURS), cax=ax, orientation="horizontal")
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", "0.25", "0.5", "0.75", "1"], fontsize=7)
    ax.set_xlabel("saliency / the map's own maximum", fontsize=7, labelpad=1)
    return _png(figure)


def mark_peak(crop: bytes, at: tuple[float, float]) -> bytes:
    """A stored cue crop (PNG bytes) with its peak ringed and crossed at `at` (x, y in the crop's pixels);
    PNG bytes. Drawn on the report's copy: the stored crop stays the plain picture."""
    with Image.open(io.BytesIO(crop)) as source:
        picture = source.convert("RGB")
    draw = ImageDraw.Draw(picture)
    x, y = at
    radius = max(4.0, 0.12 * min(picture.size))
    for colour, width in (("black", 5), (PEAK_COLOUR, 2)):  # a dark rim keeps the mark visible on any colour
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour, width=width)
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):  # ticks pointing at the peak, the peak itself left clear
            draw.line((x + dx * radius, y + dy * radius, x + 2 * dx * radius, y + 2 * dy * radius), fill=colour,
                      width=width)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
