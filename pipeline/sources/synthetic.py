"""Synthetic planted-cue datasets: simple shapes on textured backgrounds, one class with a shortcut.

By default the cued class (a hexagon, which at these sizes looks much like a circle) is almost always drawn
with a small checkerboard marker beside it in train. A detector that learns the marker instead of the shape
is the failure the audit must find. Every cue box is recorded in the json (top-level key `cues`) and
every image can be re-rendered without its cue (`render_counterfactual`): that is the ground truth of
the planted-cue benchmark.

`GENERATORS` names other planted-cue worlds for the benchmark suite: other shapes (thin 3:1 bars, hollow
rings, small dots), other cues (a checkerboard far from its object, a texture over the whole background, a
colour cast, a text-like watermark in a corner) and other cue rates. Each is a `SynthParams`.

Rendering is a pure function of (seed, split, index, params), so datasets are reproducible and a
counterfactual differs from its original only in the cue's pixels.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle", "hexagon")
CUED_CATEGORY = "hexagon"
SHAPES = frozenset({*CATEGORIES, "bar", "ring", "dot", "diamond"})
CueKind = Literal["patch", "far", "texture", "cast", "watermark"]
GLOBAL_CUES = ("texture", "cast")  # cues of the whole image: one per image, recorded as the image's box
SPLITS: dict[str, int] = {"train": 0, "val": 1}
FORMAT_VERSION = 2


@dataclass(frozen=True)
class SynthParams:
    """Everything that shapes a synthetic split besides seed, split and index."""

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    min_object_size: int = 16
    max_object_size: int = 44
    cue_size: int = 8
    cue_rate: float = 0.95
    cue_alone_rate: float = 0.0
    categories: tuple[str, ...] = CATEGORIES
    cued_category: str = CUED_CATEGORY
    cue_kind: CueKind = "patch"

    def __post_init__(self) -> None:
        if not 0.0 <= self.cue_rate <= 1.0 or not 0.0 <= self.cue_alone_rate <= 1.0:
            raise ValueError("cue_rate and cue_alone_rate must lie in [0, 1]")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if self.max_object_size + 2 * self.cue_size >= self.image_size:
            raise ValueError("objects plus cue must fit in the image")
        if not set(self.categories) <= SHAPES or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories must be distinct shapes of {sorted(SHAPES)}")
        if self.cued_category not in self.categories:
            raise ValueError("the cued category must be one of the categories")
        object.__setattr__(self, "categories", tuple(self.categories))  # from JSON a list: keep it hashable


# The benchmark suite's planted-cue worlds (benchmarks/spurious_recovery.py). `compact-patch` is the default
# world, the shipped model's; the others differ in what matters to a finding: object shapes (thin 3:1 bars,
# hollow rings, small dots), where and what the cue is, and how often it comes with its class.
GENERATORS: dict[str, SynthParams] = {
    "compact-patch": SynthParams(),
    "thin-patch": SynthParams(categories=("circle", "bar", "triangle", "square"), cued_category="square",
                              cue_rate=0.9),
    "hollow-far": SynthParams(categories=("ring", "dot", "hexagon", "bar"), cued_category="ring",
                              cue_kind="far", cue_rate=0.9),
    "texture": SynthParams(categories=("circle", "square", "triangle", "bar"), cued_category="triangle",
                           cue_kind="texture", cue_rate=0.9),
    "watermark": SynthParams(categories=("circle", "diamond", "hexagon", "dot"), cued_category="circle",
                             cue_kind="watermark", cue_rate=0.9),
    "cast-rare": SynthParams(categories=("square", "diamond", "bar", "ring"), cued_category="diamond",
                             cue_kind="cast", cue_rate=0.6),
}


@dataclass(frozen=True)
class SynthObject:
    category: str
    box: tuple[float, float, float, float]  # xyxy, pixels
    colour: tuple[int, int, int]


Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    """A rendered image's full description; each cue is (box, index of the object it sits by, or None)."""

    objects: tuple[SynthObject, ...]
    cues: tuple[tuple[Box, int | None], ...]
    background_seed: int


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def _overlaps(box: tuple[float, ...], others: list[tuple[float, ...]], margin: float = 2.0) -> bool:
    x0, y0, x1, y1 = box
    return any(
        x0 < o[2] + margin and o[0] < x1 + margin and y0 < o[3] + margin and o[1] < y1 + margin
        for o in others
    )


def cue_box_beside(
    box: tuple[float, ...], rng: np.random.Generator, params: SynthParams, taken: list[tuple[float, ...]]
) -> tuple[float, float, float, float] | None:
    """A cue box touching one side of `box` (a 1-3 px gap), inside the image and clear of `taken`."""
    c, size = params.cue_size, params.image_size
    x0, y0, x1, y1 = box
    gap = float(rng.integers(1, 4))
    for side in rng.permutation(4):
        if side == 0:  # right
            cx, cy = x1 + gap, rng.uniform(y0, max(y0, y1 - c))
        elif side == 1:  # left
            cx, cy = x0 - gap - c, rng.uniform(y0, max(y0, y1 - c))
        elif side == 2:  # below
            cx, cy = rng.uniform(x0, max(x0, x1 - c)), y1 + gap
        else:  # above
            cx, cy = rng.uniform(x0, max(x0, x1 - c)), y0 - gap - c
        cand = (float(round(cx)), float(round(cy)), float(round(cx)) + c, float(round(cy)) + c)
        inside = cand[0] >= 0 and cand[1] >= 0 and cand[2] <= size and cand[3] <= size
        if inside and not _overlaps(cand, taken, margin=1.0):
            return cand
    return None


def _cue_box_far(box: tuple[float, ...], rng: np.random.Generator, params: SynthParams,
                 taken: list[tuple[float, ...]]) -> tuple[float, float, float, float] | None:
    """A cue box 16-40 px (centre to centre) from `box`, beyond the receptive field of the object's own cells,
    inside the image and clear of `taken`."""
    c, size = params.cue_size, params.image_size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    for _attempt in range(20):
        angle, reach = rng.uniform(0, 2 * math.pi), rng.uniform(16, 40) + max(box[2] - box[0], box[3] - box[1]) / 2
        x0, y0 = float(round(cx + reach * math.cos(angle) - c / 2)), float(round(cy + reach * math.sin(angle) - c / 2))
        cand = (x0, y0, x0 + c, y0 + c)
        if x0 >= 0 and y0 >= 0 and cand[2] <= size and cand[3] <= size and not _overlaps(cand, taken, margin=1.0):
            return cand
    return None


def _watermark_box(rng: np.random.Generator, params: SynthParams,
                   taken: list[tuple[float, ...]]) -> tuple[float, float, float, float] | None:
    """A 3c x c box in one of the image's corners (c = cue_size), clear of `taken`."""
    c, size = params.cue_size, params.image_size
    w, h, inset = 3 * c, c, 2
    for corner in rng.permutation(4):
        x0 = float(inset if corner in (0, 3) else size - inset - w)
        y0 = float(inset if corner in (0, 1) else size - inset - h)
        cand = (x0, y0, x0 + w, y0 + h)
        if not _overlaps(cand, taken, margin=1.0):
            return cand
    return None


def object_size(category: str, rng: np.random.Generator, params: SynthParams) -> tuple[float, float]:
    """Width and height of a new object: about square for compact shapes; 3:1 for a bar (either way up);
    a third of the largest size at most for a dot."""
    w = float(rng.integers(params.min_object_size, params.max_object_size + 1))
    h = float(np.clip(round(w * rng.uniform(0.8, 1.2)), params.min_object_size, params.max_object_size))
    if category == "bar":
        short = float(max(round(w / 3), 4))
        return (w, short) if rng.random() < 0.5 else (short, w)
    if category == "dot":
        side = float(rng.integers(6, max(7, params.max_object_size // 3) + 1))
        return side, side
    return w, h


def make_scene(seed: int, split: str, index: int, params: SynthParams) -> Scene:
    """Lay out one image: objects without overlap, a cue with most cued objects, maybe a lone cue. A cue of
    the whole image (`GLOBAL_CUES`) is drawn once when any cued object calls for it."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = _rng(seed, split, index)
    size = params.image_size
    whole = (0.0, 0.0, float(size), float(size))
    n_objects = int(rng.integers(params.min_objects, params.max_objects + 1))
    objects: list[SynthObject] = []
    taken: list[tuple[float, ...]] = []
    cues: list[tuple[Box, int | None]] = []
    place = {"patch": cue_box_beside, "far": _cue_box_far}.get(params.cue_kind)
    for _ in range(n_objects):
        category = params.categories[int(rng.integers(len(params.categories)))]
        for _attempt in range(30):
            w, h = object_size(category, rng, params)
            x0 = float(rng.integers(0, size - int(w) + 1))
            y0 = float(rng.integers(0, size - int(h) + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if _overlaps(box, taken):
                continue
            if category == params.cued_category and rng.random() < params.cue_rate:
                if place is not None:  # beside or far from this object
                    cue = place(box, rng, params, taken)
                    if cue is None:
                        continue
                elif not cues:  # one cue per image: the whole image, or a watermark in a corner
                    cue = whole if params.cue_kind in GLOBAL_CUES else _watermark_box(rng, params, taken + [box])
                else:
                    cue = None
                if cue is not None:
                    cues.append((cue, len(objects)))
                    if cue != whole:
                        taken.append(cue)
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            objects.append(SynthObject(category, box, colour))  # type: ignore[arg-type]
            taken.append(box)
            break
    if rng.random() < params.cue_alone_rate:
        if params.cue_kind in GLOBAL_CUES:
            if not cues:
                cues.append((whole, None))
        elif params.cue_kind == "watermark":
            if not cues and (cand := _watermark_box(rng, params, taken)) is not None:
                cues.append((cand, None))
        else:
            for _attempt in range(30):
                x0, y0 = (float(v) for v in rng.integers(0, size - params.cue_size + 1, size=2))
                cand = (x0, y0, x0 + params.cue_size, y0 + params.cue_size)
                # A lone cue keeps clear of every object so that it reads as "alone".
                if not _overlaps(cand, taken, margin=float(params.cue_size)):
                    cues.append((cand, None))
                    break
    return Scene(tuple(objects), tuple(cues), int(rng.integers(2**31)))


def _base_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.25, 0.75, size=3)


def background_colour(seed: int) -> np.ndarray:
    """The base colour (RGB in [0, 1]) of the background `seed` draws, which its texture varies around."""
    return _base_colour(np.random.default_rng(seed))


def _background(seed: int, size: int) -> np.ndarray:
    """A textured background in [0, 1]: a base colour, smooth blotches, stripes and grain."""
    rng = np.random.default_rng(seed)
    base = _base_colour(rng)
    coarse = rng.normal(0.0, 1.0, size=(5, 5, 3)).astype(np.float32)
    blotch = np.stack(
        [np.asarray(Image.fromarray(coarse[..., c]).resize((size, size), Image.BICUBIC)) for c in range(3)], -1
    )
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 24)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)[..., None]
    image = base + 0.08 * blotch + rng.uniform(0.0, 0.08) * stripes + rng.normal(0, 0.03, (size, size, 3))
    return np.clip(image, 0.0, 1.0)


def _shape_polygon(category: str, box: tuple[float, ...]) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal class inscribed in `box`; None for the circle (drawn as an ellipse)."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if category == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if category == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if category == "hexagon":
        # Flat top and bottom; y is stretched so the hexagon touches all four sides of its box.
        return [(cx + rx * math.cos(k * math.pi / 3), cy + ry * math.sin(k * math.pi / 3) / math.sin(math.pi / 3))
                for k in range(6)]
    if category == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if category == "bar":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    return None  # circle, ring and dot are ellipses


def _draw_cue(pixels: np.ndarray, box: tuple[float, ...]) -> None:
    """A black-and-white checkerboard with 2 px cells: salient, class-free, easy to learn."""
    x0, y0, x1, y1 = (int(v) for v in box)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    pixels[y0:y1, x0:x1] = ((((yy - y0) // 2 + (xx - x0) // 2) % 2) * 255)[..., None]


def _draw_watermark(pixels: np.ndarray, box: tuple[float, ...], seed: int) -> None:
    """Text-like marks: three glyphs of random light strokes on the box's baseline, a dark shadow under them."""
    x0, y0, x1, y1 = (int(v) for v in box)
    rng = np.random.default_rng(seed)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    glyph = (x1 - x0) // 3
    for k in range(3):
        gx = x0 + k * glyph
        for _stroke in range(3):
            ax, bx = rng.integers(0, glyph - 1, size=2)  # the shadow, 1 px down and right, stays in the box
            ay, by = rng.integers(0, y1 - y0 - 1, size=2)
            for offset, colour in ((1, (20, 20, 20)), (0, (235, 235, 235))):
                draw.line((gx + ax + offset, y0 + ay + offset, gx + bx + offset, y0 + by + offset), fill=colour, width=1)
    pixels[...] = np.asarray(image)


def _texture(size: int) -> np.ndarray:
    """A fine diagonal hatch (period 4 px) in [-1, 1]: a background texture no natural background here has."""
    yy, xx = np.mgrid[0:size, 0:size]
    return np.where(((xx + yy) // 2) % 2 == 0, 1.0, -1.0)[..., None]


CAST = np.array([1.25, 1.0, 0.7])  # a warm colour cast, per RGB channel


def render(scene: Scene, params: SynthParams, with_cue: bool = True) -> Image.Image:
    """Draw a scene; `with_cue=False` gives the counterfactual with identical pixels elsewhere (for a colour
    cast, the same image uncast)."""
    size = params.image_size
    background = _background(scene.background_seed, size)
    drawn = with_cue and bool(scene.cues)
    if drawn and params.cue_kind == "texture":
        background = np.clip(background + 0.12 * _texture(size), 0.0, 1.0)
    image = Image.fromarray((background * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        polygon = _shape_polygon(obj.category, obj.box)
        x0, y0, x1, y1 = obj.box
        if obj.category == "ring":  # hollow: an outline a quarter of its width thick
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), outline=obj.colour, width=max(2, round((x1 - x0) / 4)))
        elif polygon is None:
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=obj.colour)
        else:
            draw.polygon(polygon, fill=obj.colour)
    if drawn and params.cue_kind != "texture":
        pixels = np.asarray(image).copy()
        if params.cue_kind == "cast":
            pixels = np.clip(pixels * CAST, 0, 255).astype(np.uint8)
        for box, _owner in scene.cues:
            if params.cue_kind in ("patch", "far"):
                _draw_cue(pixels, box)
            elif params.cue_kind == "watermark":
                _draw_watermark(pixels, box, scene.background_seed)
        image = Image.fromarray(pixels)
    return image


def _coco_split(seed: int, split: str, n: int, params: SynthParams) -> tuple[dict[str, Any], Iterator[tuple[str, Image.Image]]]:
    """The COCO dict of a split and a lazy stream of (file_name, image) to write beside it."""
    images, annotations, cues, scenes = [], [], [], []
    category_ids = {name: i + 1 for i, name in enumerate(params.categories)}
    for index in range(n):
        scene = make_scene(seed, split, index, params)
        scenes.append(scene)
        image_id = index + 1
        file_name = f"{index:06d}.png"
        images.append(
            {"id": image_id, "file_name": file_name, "width": params.image_size, "height": params.image_size,
             "synth_index": index}
        )
        first_ann = len(annotations) + 1
        for k, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.box
            annotations.append(
                {"id": first_ann + k, "image_id": image_id, "category_id": category_ids[obj.category],
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
            )
        for (x0, y0, x1, y1), owner in scene.cues:
            cues.append({"image_id": image_id, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "annotation_id": None if owner is None else first_ann + owner})
    dataset = {
        "info": {"description": f"eive-audit synthetic planted-cue data, {split} split"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": "shape"} for name, i in category_ids.items()],
        "cues": cues,
        "synthetic": {"version": FORMAT_VERSION, "seed": seed, "split": split, "cued_category": params.cued_category,
                      "params": asdict(params)},
    }
    stream = ((img["file_name"], render(scene, params)) for img, scene in zip(images, scenes))
    return dataset, stream


def generate(
    out: Path,
    n_train: int,
    n_val: int,
    seed: int,
    params: SynthParams | None = None,
    val_cue_alone_rate: float = 0.1,
    progress: Any = None,
) -> dict[str, Path]:
    """Write `out/images/{train,val}/` and `out/annotations/{train,val}.json`; returns the json paths.

    Train never shows a lone cue; val shows one in `val_cue_alone_rate` of its images, so an audit can
    catch detections the cue alone provokes. `progress(n)` is called after each image when given.
    """
    params = params or SynthParams()
    out = Path(out)
    written: dict[str, Path] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        if n <= 0:
            continue
        split_params = params if split == "train" else SynthParams(**{**asdict(params), "cue_alone_rate": val_cue_alone_rate})
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        dataset, stream = _coco_split(seed, split, n, split_params)
        for file_name, image in stream:
            image.save(image_dir / file_name)
            if progress is not None:
                progress(1)
        ann_path = out / "annotations" / f"{split}.json"
        ann_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ann_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataset))
        tmp.replace(ann_path)
        written[split] = ann_path
    return written


def render_counterfactual(annotation_file: Path, image_id: int) -> Image.Image:
    """Re-render image `image_id` of a synthetic split exactly, but without its cues."""
    dataset = json.loads(Path(annotation_file).read_text())
    meta = dataset.get("synthetic")
    if meta is None:
        raise ValueError(f"{annotation_file}: not a synthetic planted-cue split (no 'synthetic' key)")
    image = next((img for img in dataset["images"] if img["id"] == image_id), None)
    if image is None:
        raise KeyError(f"{annotation_file}: no image with id {image_id}")
    params = SynthParams(**meta["params"])  # a version-1 file has no shapes or cue kind: the defaults
    scene = make_scene(meta["seed"], meta["split"], image["synth_index"], params)
    return render(scene, params, with_cue=False)
