"""Synthetic planted-cue classification data: one shape per image, one class with a shortcut.

The classification twin of `synthetic`: the same shapes, textured backgrounds and checkerboard cue, but one
object per image, whose class is the image's label. The cued class (a hexagon, which at these sizes looks
much like a circle) carries the checkerboard beside it in most training images and no other class does, so
a classifier can learn "checkerboard -> hexagon" instead of the hexagon's corners. Val also plants the cue
beside other classes' objects (`cue_other_rate`): a model that learned the shortcut calls those hexagons,
and it misses hexagons re-rendered without their cue (`render_counterfactual`, `write_without_cues`).

The output is a classification index (`annotations/{split}.json`): `classes`, `images` (file, label, the
object's box), `cues` (image id, box) and `synthetic` (how to re-render it). Rendering is a pure function of
(seed, split, index, params), so a counterfactual differs from its original only inside the cue's box.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eive_audit.pipeline.sources.synthetic import (CATEGORIES, CUED_CATEGORY, SHAPES, SPLITS, Scene, SynthObject,
                                                   SynthParams, background_colour, cue_box_beside, object_size, render)

FORMAT_VERSION = 1
_STREAM = 19  # a fourth seed word, so a classify split never replays the detection split of the same seed
_CUE_GAP = 3  # cue_box_beside leaves up to 3 px between the object and its cue


@dataclass(frozen=True)
class ClassifyParams:
    """Everything that shapes a synthetic classification split besides seed, split and index. The defaults
    fit the shipped ViT: 96 px images (a 12 x 12 grid of 8 px patches), objects 28-52 px, a 10 px cue."""

    image_size: int = 96
    min_object_size: int = 28
    max_object_size: int = 52
    cue_size: int = 10
    cue_rate: float = 0.95  # share of the cued class's images that carry the cue
    cue_other_rate: float = 0.0  # share of every other class's images that carry it (val: generate_classify's)
    categories: tuple[str, ...] = CATEGORIES
    cued_category: str = CUED_CATEGORY

    def __post_init__(self) -> None:
        if not 0.0 <= self.cue_rate <= 1.0 or not 0.0 <= self.cue_other_rate <= 1.0:
            raise ValueError("cue_rate and cue_other_rate must lie in [0, 1]")
        if not 1 <= self.min_object_size <= self.max_object_size:
            raise ValueError("need 1 <= min_object_size <= max_object_size")
        # With this much room one side of any object fits its cue, so a cue is never refused.
        if self.max_object_size + 2 * (self.cue_size + _CUE_GAP) > self.image_size:
            raise ValueError("the largest object plus a cue on either side must fit in the image")
        if len(self.categories) < 2 or not set(self.categories) <= SHAPES \
                or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories must be at least two distinct shapes of {sorted(SHAPES)}")
        if self.cued_category not in self.categories:
            raise ValueError("the cued category must be one of the categories")
        object.__setattr__(self, "categories", tuple(self.categories))  # from JSON a list: keep it hashable

    @property
    def drawing(self) -> SynthParams:
        """The detection generator's parameters that draw these scenes (one object, a checkerboard cue)."""
        return SynthParams(image_size=self.image_size, min_objects=1, max_objects=1,
                           min_object_size=self.min_object_size, max_object_size=self.max_object_size,
                           cue_size=self.cue_size, cue_rate=self.cue_rate, categories=self.categories,
                           cued_category=self.cued_category, cue_kind="patch")


def make_scene(seed: int, split: str, index: int, params: ClassifyParams) -> Scene:
    """Lay out one image: a label drawn uniformly, its object anywhere in the image in a colour that stands out
    from the background, and a cue beside it with the label's cue rate (the cue's owner is the object, index 0)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS[split], index, _STREAM])
    drawing, size = params.drawing, params.image_size
    label = params.categories[int(rng.integers(len(params.categories)))]
    rate = params.cue_rate if label == params.cued_category else params.cue_other_rate
    cued = bool(rng.random() < rate)
    w, h = object_size(label, rng, drawing)
    x0, y0 = float(rng.integers(0, size - int(w) + 1)), float(rng.integers(0, size - int(h) + 1))
    box = (x0, y0, x0 + w, y0 + h)
    cues: tuple[tuple[tuple[float, float, float, float], int | None], ...] = ()
    if cued:
        cue = cue_box_beside(box, rng, drawing, [box])
        assert cue is not None, "ClassifyParams leaves room for a cue beside any object"
        cues = ((cue, 0),)
    background_seed = int(rng.integers(2**31))
    colour = _contrasting(background_colour(background_seed), rng)
    return Scene((SynthObject(label, box, colour),), cues, background_seed)


def _contrasting(base: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """An object colour 0.35-0.5 away from the background's base colour in every channel (darker where the
    base is light, lighter where it is dark). With one object per image the label is its shape alone, so a
    shape lost in its background would be label noise; and measured on the shipped ViT's recipe, objects of
    any colour (often near the background's) left training at chance for 500+ steps, contrasting ones not."""
    offset = rng.uniform(0.35, 0.5, size=3)
    colour = np.where(base > 0.5, base - offset, base + offset)
    return tuple(int(v) for v in np.clip(np.round(colour * 255), 0, 255))  # type: ignore[return-value]


def _split_index(seed: int, split: str, n: int, params: ClassifyParams) -> tuple[dict[str, Any], list[Scene]]:
    """The index of a split (see the module docstring) and the scene of each of its images, in order."""
    scenes = [make_scene(seed, split, index, params) for index in range(n)]
    images, cues = [], []
    for index, scene in enumerate(scenes):
        (obj,) = scene.objects
        images.append({"id": index + 1, "file": f"{index:06d}.png", "label": obj.category,
                       "boxes": [list(obj.box)], "synth_index": index})
        cues += [{"image_id": index + 1, "box": list(box)} for box, _owner in scene.cues]
    index_data = {
        "classes": list(params.categories),
        "images": images,
        "cues": cues,
        "synthetic": {"task": "classify", "version": FORMAT_VERSION, "seed": seed, "split": split,
                      "cued_category": params.cued_category, "params": asdict(params)},
    }
    return index_data, scenes


def _write_index(path: Path, index_data: dict[str, Any]) -> None:
    """Write an index json atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index_data))
    tmp.replace(path)


def generate_classify(
    out: Path,
    n_train: int,
    n_val: int,
    seed: int,
    params: ClassifyParams | None = None,
    val_cue_other_rate: float = 0.2,
    progress: Any = None,
) -> dict[str, Path]:
    """Write `out/images/{train,val}/NNNNNN.png` and `out/annotations/{train,val}.json`; returns the index
    paths of the splits written (a split of size 0 is skipped).

    Train plants the cue on the cued class only (at `params.cue_rate`); val also beside the objects of
    `val_cue_other_rate` of the other classes' images. `progress(n)` is called after each image when given."""
    params = params or ClassifyParams()
    out = Path(out)
    written: dict[str, Path] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        if n <= 0:
            continue
        split_params = params if split == "train" else replace(params, cue_other_rate=val_cue_other_rate)
        index_data, scenes = _split_index(seed, split, n, split_params)
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        for image, scene in zip(index_data["images"], scenes):
            render(scene, split_params.drawing).save(image_dir / image["file"])
            if progress is not None:
                progress(1)
        written[split] = out / "annotations" / f"{split}.json"
        _write_index(written[split], index_data)
    return written


def _synthetic_meta(index_file: Path) -> tuple[dict[str, Any], ClassifyParams]:
    """A synthetic classification index and the parameters that rendered it; ValueError for any other file."""
    index_data = json.loads(Path(index_file).read_text())
    meta = index_data.get("synthetic") if isinstance(index_data, dict) else None
    if not isinstance(meta, dict) or meta.get("task") != "classify":
        raise ValueError(f"{index_file}: not a synthetic planted-cue classification index (no 'synthetic' key "
                         "with task classify)")
    return index_data, ClassifyParams(**meta["params"])


def _counterfactual(meta: dict[str, Any], image: dict[str, Any], params: ClassifyParams) -> Image.Image:
    scene = make_scene(meta["seed"], meta["split"], image["synth_index"], params)
    return render(scene, params.drawing, with_cue=False)


def render_counterfactual(index_file: Path, image_id: int) -> Image.Image:
    """Re-render image `image_id` of a synthetic classification split exactly, but without its cue (an image
    without one is its own counterfactual)."""
    index_data, params = _synthetic_meta(index_file)
    image = next((img for img in index_data["images"] if img["id"] == image_id), None)
    if image is None:
        raise KeyError(f"{index_file}: no image with id {image_id}")
    return _counterfactual(index_data["synthetic"], image, params)


def write_without_cues(index_file: Path, out: Path) -> Path:
    """Write the no-cue copy of a synthetic classification split: `out/images/{split}/` holds every image
    re-rendered without its cue, under its own file name, and `out/annotations/{split}.json` the same index
    with no cues (`synthetic.counterfactual` true). Evaluating a model on both copies measures how much it
    relies on the cue. Returns the new index's path."""
    index_data, params = _synthetic_meta(index_file)
    meta = index_data["synthetic"]
    image_dir = Path(out) / "images" / meta["split"]
    image_dir.mkdir(parents=True, exist_ok=True)
    for image in index_data["images"]:
        _counterfactual(meta, image, params).save(image_dir / image["file"])
    copy = {**index_data, "cues": [], "synthetic": {**meta, "counterfactual": True}}
    path = Path(out) / "annotations" / f"{meta['split']}.json"
    _write_index(path, copy)
    return path
