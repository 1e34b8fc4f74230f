"""The planted-cue generator: deterministic by seed, cue recorded beside its object, exact counterfactuals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from cli import invoke, invoke_ok
from PIL import Image

from eive_audit.pipeline.sources import CocoSource, ImageRecord
from eive_audit.pipeline.sources.synthetic import (CUED_CATEGORY, GENERATORS, SynthParams, generate, make_scene, render,
                                                  render_counterfactual)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_cli_is_deterministic_by_seed(tmp_path: Path) -> None:
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        invoke_ok("synth", "--n-train", "6", "--n-val", "4", "--out", str(tmp_path / name), "--seed", seed)
    assert (tmp_path / "a" / "images" / "train" / "000005.png").is_file()
    assert (tmp_path / "a" / "annotations" / "val.json").is_file()
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_output_is_plain_coco_plus_cues(synth: Path) -> None:
    ann = synth / "annotations" / "val.json"
    source = CocoSource(ann, synth / "images" / "val")
    records = [r for r in source if isinstance(r, ImageRecord)]
    assert len(records) == 40 and all(1 <= len(r.labels) <= 4 for r in records)
    raw = json.loads(ann.read_text())
    assert {c["name"] for c in raw["categories"]} >= {CUED_CATEGORY, "circle"}
    assert raw["cues"], "some val image must carry a cue"


def test_cue_sits_beside_a_cued_object_and_is_drawn(synth: Path) -> None:
    raw = json.loads((synth / "annotations" / "train.json").read_text())
    anns = {a["id"]: a for a in raw["annotations"]}
    cued_id = next(c["id"] for c in raw["categories"] if c["name"] == CUED_CATEGORY)
    owned = [c for c in raw["cues"] if c["annotation_id"] is not None]
    assert owned
    for cue in owned:
        owner = anns[cue["annotation_id"]]
        assert owner["category_id"] == cued_id and owner["image_id"] == cue["image_id"]
        cx, cy, cw, ch = cue["bbox"]
        ox, oy, ow, oh = owner["bbox"]
        gap_x = max(ox - (cx + cw), cx - (ox + ow), 0)
        gap_y = max(oy - (cy + ch), cy - (oy + oh), 0)
        assert max(gap_x, gap_y) <= 3, "the cue touches its object (1-3 px gap)"
        image = np.asarray(Image.open(synth / "images" / "train" / f"{cue['image_id'] - 1:06d}.png"))
        patch = image[int(cy):int(cy + ch), int(cx):int(cx + cw)]
        assert set(np.unique(patch)) == {0, 255}, "the cue is a black-and-white checkerboard"


def test_cue_rate_in_train_and_lone_cues_only_in_val(tmp_path: Path) -> None:
    generate(tmp_path, n_train=300, n_val=300, seed=11)
    train = json.loads((tmp_path / "annotations" / "train.json").read_text())
    val = json.loads((tmp_path / "annotations" / "val.json").read_text())
    cued_id = next(c["id"] for c in train["categories"] if c["name"] == CUED_CATEGORY)
    n_cued = sum(a["category_id"] == cued_id for a in train["annotations"])
    with_cue = sum(c["annotation_id"] is not None for c in train["cues"])
    assert 0.9 <= with_cue / n_cued <= 0.99, f"default cue rate is 0.95, got {with_cue / n_cued:.3f}"
    assert all(c["annotation_id"] is not None for c in train["cues"]), "train never shows a lone cue"
    lone = sum(c["annotation_id"] is None for c in val["cues"])
    assert 10 <= lone <= 60, f"about 10% of 300 val images carry a lone cue, got {lone}"


def test_counterfactual_differs_only_inside_the_cue_box(synth: Path) -> None:
    ann = synth / "annotations" / "val.json"
    raw = json.loads(ann.read_text())
    for image_id in sorted({c["image_id"] for c in raw["cues"]})[:5]:
        original = np.asarray(Image.open(synth / "images" / "val" / f"{image_id - 1:06d}.png")).astype(int)
        without = np.asarray(render_counterfactual(ann, image_id)).astype(int)
        changed = (original != without).any(-1)
        in_cues = np.zeros_like(changed)
        for cue in (c for c in raw["cues"] if c["image_id"] == image_id):
            x, y, w, h = (int(v) for v in cue["bbox"])
            in_cues[y:y + h, x:x + w] = True
            assert changed[y:y + h, x:x + w].any(), "every cue is removed"
        assert not (changed & ~in_cues).any(), "nothing outside the cue boxes changes"


def test_scene_is_a_pure_function_of_seed_split_index() -> None:
    params = SynthParams()
    a = np.asarray(render(make_scene(1, "val", 7, params), params))
    b = np.asarray(render(make_scene(1, "val", 7, params), params))
    c = np.asarray(render(make_scene(1, "train", 7, params), params))
    assert (a == b).all() and (a != c).any()


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_every_generator_plants_its_cue_with_its_class_and_renders_it_away(name: str, tmp_path: Path) -> None:
    """Each benchmark world: its own categories, cues with its cued class (a local cue beside or far from its
    object, a watermark in a corner, a texture or cast over the whole image), lone cues only in val, and a
    counterfactual that changes only the cue: its box for a local cue, never an object's pixels for a
    background texture, every pixel for a colour cast."""
    params = GENERATORS[name]
    ann = generate(tmp_path, n_train=0, n_val=30, seed=5, params=params, val_cue_alone_rate=0.3)["val"]
    raw = json.loads(ann.read_text())
    assert [c["name"] for c in raw["categories"]] == list(params.categories)
    assert raw["synthetic"]["cued_category"] == params.cued_category
    names = {c["id"]: c["name"] for c in raw["categories"]}
    anns = {a["id"]: a for a in raw["annotations"]}
    assert raw["cues"] and any(c["annotation_id"] is None for c in raw["cues"]), "cued objects and lone cues"
    assert all(names[anns[c["annotation_id"]]["category_id"]] == params.cued_category
               for c in raw["cues"] if c["annotation_id"] is not None)
    cued = {c["image_id"] for c in raw["cues"]}
    for image in raw["images"][:12]:
        original = np.asarray(Image.open(tmp_path / "images" / "val" / image["file_name"])).astype(int)
        changed = (original != np.asarray(render_counterfactual(ann, image["id"])).astype(int)).any(-1)
        if image["id"] not in cued:
            assert not changed.any(), "an image without a cue is its own counterfactual"
            continue
        assert changed.any(), "every cue is removed"
        boxes = [[int(v) for v in a["bbox"]] for a in raw["annotations"] if a["image_id"] == image["id"]]
        if params.cue_kind in ("patch", "far", "watermark"):
            inside = np.zeros_like(changed)
            for x, y, w, h in (c["bbox"] for c in raw["cues"] if c["image_id"] == image["id"]):
                inside[int(y):int(y + h), int(x):int(x + w)] = True
            assert not (changed & ~inside).any(), "nothing outside the cue boxes changes"
        elif params.cue_kind == "texture":
            for x, y, w, h in boxes:  # the centre of each object's box lies on the object: never textured
                cx, cy = x + w // 2, y + h // 2
                assert not changed[cy - 1:cy + 2, cx - 1:cx + 2].any()
        else:
            assert changed.mean() > 0.9, "a colour cast changes the whole image"


def test_thin_bars_are_three_to_one_and_dots_are_small() -> None:
    params = GENERATORS["hollow-far"]  # rings, dots, hexagons and bars
    sizes: dict[str, list[tuple[float, float]]] = {}
    for index in range(60):
        for obj in make_scene(0, "train", index, params).objects:
            x0, y0, x1, y1 = obj.box
            sizes.setdefault(obj.category, []).append((x1 - x0, y1 - y0))
    assert all(max(w, h) / min(w, h) >= 2.5 for w, h in sizes["bar"])
    assert all(max(w, h) <= 14 for w, h in sizes["dot"])
    assert {"ring", "hexagon"} <= set(sizes)


def test_the_synth_command_takes_a_generator_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    invoke_ok("synth", "--n-train", "0", "--n-val", "3", "--out", str(tmp_path / "w"), "--generator", "watermark")
    raw = json.loads((tmp_path / "w" / "annotations" / "val.json").read_text())
    assert raw["synthetic"]["params"]["cue_kind"] == "watermark"
    done = invoke("synth", "--n-val", "1", "--out", str(tmp_path / "x"), "--generator", "nope")
    assert done.code == 2 and "unknown generator 'nope'" in done.stderr
