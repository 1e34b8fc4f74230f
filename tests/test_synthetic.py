"""The planted-cue generator: deterministic by seed, cue recorded beside its object, exact counterfactuals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from cli import invoke_ok
from PIL import Image

from eive_audit.pipeline.sources import CocoSource, ImageRecord
from eive_audit.pipeline.sources.synthetic import CUED_CATEGORY, SynthParams, generate, make_scene, render, render_counterfactual


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
