"""The planted-cue classification generator: deterministic by seed, one object per image with its box, the cue
beside the cued class in train and beside other classes too in val, exact counterfactuals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eive_audit.pipeline.sources.synthetic_classify import (ClassifyParams, generate_classify, make_scene,
                                                            render_counterfactual, write_without_cues)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth_classify")
    generate_classify(root, n_train=16, n_val=40, seed=3, val_cue_other_rate=0.5)
    return root


def test_generation_is_deterministic_by_seed(data: Path, tmp_path: Path) -> None:
    generate_classify(tmp_path / "same", n_train=16, n_val=40, seed=3, val_cue_other_rate=0.5)
    generate_classify(tmp_path / "other", n_train=16, n_val=40, seed=4, val_cue_other_rate=0.5)
    assert _digest(tmp_path / "same") == _digest(data)
    assert _digest(tmp_path / "other") != _digest(data)


def test_the_index_has_one_labelled_object_box_per_image_inside_it(data: Path) -> None:
    params = ClassifyParams()
    for split, n in (("train", 16), ("val", 40)):
        index = json.loads((data / "annotations" / f"{split}.json").read_text())
        assert index["classes"] == list(params.categories)
        assert index["synthetic"]["task"] == "classify" and index["synthetic"]["split"] == split
        assert [image["id"] for image in index["images"]] == list(range(1, n + 1))
        for image in index["images"]:
            assert image["label"] in index["classes"]
            (x0, y0, x1, y1), = image["boxes"]
            assert 0 <= x0 < x1 <= params.image_size and 0 <= y0 < y1 <= params.image_size
            assert params.min_object_size <= x1 - x0 <= params.max_object_size
            with Image.open(data / "images" / split / image["file"]) as picture:
                assert picture.size == (params.image_size, params.image_size)


def test_each_cue_is_a_checkerboard_beside_its_image_object(data: Path) -> None:
    index = json.loads((data / "annotations" / "val.json").read_text())
    images = {image["id"]: image for image in index["images"]}
    assert index["cues"] and len({c["image_id"] for c in index["cues"]}) == len(index["cues"]), "one cue per image"
    for cue in index["cues"]:
        cx0, cy0, cx1, cy1 = cue["box"]
        (ox0, oy0, ox1, oy1), = images[cue["image_id"]]["boxes"]
        assert 0 <= cx0 and 0 <= cy0 and cx1 <= 96 and cy1 <= 96 and cx1 - cx0 == cy1 - cy0 == 10
        assert 1 <= max(ox0 - cx1, cx0 - ox1, oy0 - cy1, cy0 - oy1) <= 3, "the cue touches its object (1-3 px gap)"
        pixels = np.asarray(Image.open(data / "images" / "val" / images[cue["image_id"]]["file"]))
        assert set(np.unique(pixels[int(cy0):int(cy1), int(cx0):int(cx1)])) == {0, 255}


def test_cue_rates_follow_the_class_and_the_split() -> None:
    """Scenes only (no drawing): 0.95 of the cued class's images carry the cue in both splits, no other
    class in train, the val rate of the others in val."""
    train, val = ClassifyParams(), ClassifyParams(cue_other_rate=0.2)
    rates: dict[tuple[str, bool], list[bool]] = {}
    for split, params in (("train", train), ("val", val)):
        for index in range(1500):
            scene = make_scene(0, split, index, params)
            rates.setdefault((split, scene.objects[0].category == params.cued_category), []).append(bool(scene.cues))
    assert 0.92 <= np.mean(rates["train", True]) <= 0.98 and 0.92 <= np.mean(rates["val", True]) <= 0.98
    assert not any(rates["train", False]), "train never plants the cue on another class"
    assert 0.16 <= np.mean(rates["val", False]) <= 0.24


def test_a_counterfactual_differs_only_inside_the_cue_box(data: Path, tmp_path: Path) -> None:
    index_file = data / "annotations" / "val.json"
    index = json.loads(index_file.read_text())
    cues = {c["image_id"]: c["box"] for c in index["cues"]}
    copy = json.loads(write_without_cues(index_file, tmp_path).read_text())
    assert copy["cues"] == [] and copy["images"] == index["images"] and copy["synthetic"]["counterfactual"]
    for image in index["images"][:12]:
        original = np.asarray(Image.open(data / "images" / "val" / image["file"])).astype(int)
        without = np.asarray(render_counterfactual(index_file, image["id"])).astype(int)
        assert (np.asarray(Image.open(tmp_path / "images" / "val" / image["file"])) == without).all()
        changed = (original != without).any(-1)
        if image["id"] not in cues:
            assert not changed.any(), "an image without a cue is its own counterfactual"
            continue
        x0, y0, x1, y1 = (int(v) for v in cues[image["id"]])
        inside = np.zeros_like(changed)
        inside[y0:y1, x0:x1] = True
        assert changed[inside].any() and not changed[~inside].any()


def test_bad_parameters_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must fit"):
        ClassifyParams(max_object_size=80)
    with pytest.raises(ValueError, match="cued category"):
        ClassifyParams(categories=("circle", "square"))
    foreign = tmp_path / "index.json"
    foreign.write_text(json.dumps({"images": [{"file": "a.png", "label": "cat"}]}))
    with pytest.raises(ValueError, match="not a synthetic planted-cue classification index"):
        render_counterfactual(foreign, 1)
