"""COCO reader on real coco_tiny, and every kind of bad input it must turn into an error, not a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eive_audit.pipeline.sources import CocoSource, ErrorReason, ImageRecord, SourceError, SourceFormatError


@pytest.mark.parametrize("split", ["val2017", "train2017"])
def test_counts_match_the_json(coco_tiny: Path, split: str) -> None:
    ann_file = coco_tiny / "annotations" / f"instances_{split}.json"
    raw = json.loads(ann_file.read_text())
    items = list(CocoSource(ann_file, coco_tiny / split))
    records = [r for r in items if isinstance(r, ImageRecord)]
    errors = [e for e in items if isinstance(e, SourceError)]
    assert len(records) == len(raw["images"]) == 80
    n_boxes = sum(len(r.labels) for r in records)
    # Every annotation is either a box of its image or an error naming it: nothing is silently lost.
    assert n_boxes + len(errors) == len(raw["annotations"])
    assert all(e.annotation_id is not None for e in errors)


def test_record_boxes_are_absolute_xyxy_with_names(coco_tiny: Path) -> None:
    ann_file = coco_tiny / "annotations" / "instances_val2017.json"
    raw = json.loads(ann_file.read_text())
    source = CocoSource(ann_file, coco_tiny / "val2017")
    record = next(r for r in source if isinstance(r, ImageRecord) and len(r.labels))
    ann = next(a for a in raw["annotations"] if a["id"] == record.annotation_ids[0])
    x, y, w, h = ann["bbox"]
    np.testing.assert_allclose(record.boxes[0], [x, y, min(x + w, record.width), min(y + h, record.height)], atol=1e-3)
    assert record.names[0] == source.categories[ann["category_id"]]
    assert record.path.is_file() and record.width > 0 and record.height > 0


def test_every_bad_input_becomes_a_typed_error(broken: tuple[Path, Path]) -> None:
    items = list(CocoSource(*broken))
    errors = {(e.image_id, e.annotation_id): e for e in items if isinstance(e, SourceError)}
    records = {r.image_id: r for r in items if isinstance(r, ImageRecord)}
    assert errors[(2, None)].reason is ErrorReason.MISSING_FILE
    assert errors[(3, None)].reason is ErrorReason.UNREADABLE_IMAGE
    assert errors[(4, None)].reason is ErrorReason.PATH_ESCAPES_ROOT
    assert errors[(5, 11)].reason is ErrorReason.BOX_OUT_OF_BOUNDS
    assert errors[(5, 12)].reason is ErrorReason.DEGENERATE_BOX
    assert errors[(5, 13)].reason is ErrorReason.UNKNOWN_CATEGORY
    assert "99" in errors[(5, 13)].message
    # The stream goes on: the good image and the good box of the bad image survive.
    assert sorted(records) == [1, 5]
    assert records[5].annotation_ids == (14,)


def test_absolute_file_name_cannot_escape(broken: tuple[Path, Path], tmp_path: Path) -> None:
    ann_file, root = broken
    raw = json.loads(ann_file.read_text())
    raw["images"] = [{"id": 1, "file_name": str(tmp_path / "outside.png"), "width": 64, "height": 48}]
    raw["annotations"] = []
    ann_file.write_text(json.dumps(raw))
    (error,) = list(CocoSource(ann_file, root))
    assert isinstance(error, SourceError) and error.reason is ErrorReason.PATH_ESCAPES_ROOT


@pytest.mark.parametrize(
    "content, problem",
    [("not json at all", "not valid JSON"), ("[1, 2]", "top level is list"),
     ('{"images": []}', "missing list 'annotations'"),
     ('{"images": [{"id": 1}], "annotations": [], "categories": []}', "file_name")],
)
def test_non_coco_json_fails_at_once_naming_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "weird.json"
    path.write_text(content)
    with pytest.raises(SourceFormatError) as info:
        CocoSource(path, tmp_path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(SourceFormatError, match="not found"):
        CocoSource(tmp_path / "nope.json", tmp_path)


def test_folder_source_yields_images_without_gt(coco_tiny: Path, tmp_path: Path) -> None:
    from eive_audit.pipeline.sources import FolderSource

    folder = tmp_path / "imgs"
    shutil.copytree(coco_tiny / "val2017", folder)
    (folder / "broken.jpg").write_bytes(b"nope")
    items = list(FolderSource(folder))
    records = [r for r in items if isinstance(r, ImageRecord)]
    errors = [e for e in items if isinstance(e, SourceError)]
    assert len(records) == 80 and all(len(r.labels) == 0 for r in records)
    assert [e.reason for e in errors] == [ErrorReason.UNREADABLE_IMAGE]


# --- Validation of ids, references and boxes (issue 15); the whole-run view is tests/test_bad_inputs.py ---

OK_IMAGE = {"id": 1, "file_name": "ok.png", "width": 64, "height": 48}
GOOD_BOX = {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 8]}


def _dataset(tmp_path: Path, images: list[dict], annotations: list[dict],
             categories: list[dict] | None = None) -> tuple[Path, Path]:
    """An annotation file and its image root, which holds one 64x48 `ok.png` (and `ok2.png`, the same)."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    for name in ("ok.png", "ok2.png"):
        Image.new("RGB", (64, 48), "gray").save(root / name)
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": categories or [{"id": 1, "name": "thing"}]}))
    return ann_file, root


Found = tuple[int | None, int | None, ErrorReason]  # (image id, annotation id, reason) of an error


def _read(ann_file: Path, root: Path) -> tuple[list[Found], dict[int, ImageRecord]]:
    """(image id, annotation id, reason) of every error of a full pass, sorted, and the records by image id."""
    items = list(CocoSource(ann_file, root))
    errors = sorted(((e.image_id, e.annotation_id, e.reason) for e in items if isinstance(e, SourceError)),
                    key=lambda e: (e[0] is None, e[0] or 0, e[1] or 0))
    return errors, {r.image_id: r for r in items if isinstance(r, ImageRecord)}


@pytest.mark.parametrize(("bbox", "reason"), [
    ([float("nan"), 10, 30, 30], ErrorReason.NON_FINITE_BOX),  # json's NaN: every comparison with it is false
    ([1, 1, float("inf"), 5], ErrorReason.NON_FINITE_BOX),
    ([float("-inf"), 1, 5, 5], ErrorReason.NON_FINITE_BOX),
    ([1, 1, 10 ** 400, 5], ErrorReason.NON_FINITE_BOX),  # a json integer too large for a float
    ([True, 1, 5, 5], ErrorReason.MALFORMED_ANNOTATION),  # json's true is an int to Python, not a number
    ([1, 1, 5, False], ErrorReason.MALFORMED_ANNOTATION),
    ({"x": 1, "y": 1, "w": 5, "h": 5}, ErrorReason.MALFORMED_ANNOTATION),
    ([1, 2, 3], ErrorReason.MALFORMED_ANNOTATION),
    (["1", 1, 5, 5], ErrorReason.MALFORMED_ANNOTATION),
    (None, ErrorReason.MALFORMED_ANNOTATION),
])
def test_a_box_that_is_not_four_finite_numbers_is_an_annotation_error(tmp_path: Path, bbox: object,
                                                                      reason: ErrorReason) -> None:
    bad = {"id": 10, "image_id": 1, "category_id": 1, "bbox": bbox}
    errors, records = _read(*_dataset(tmp_path, [OK_IMAGE], [bad, GOOD_BOX]))
    assert errors == [(1, 10, reason)]
    assert records[1].annotation_ids == (11,), "the image is still audited with its good box"


def test_entries_that_share_an_image_id_are_each_an_error_and_none_is_audited(tmp_path: Path) -> None:
    images = [OK_IMAGE, {"id": 2, "file_name": "ok.png", "width": 64, "height": 48},
              {"id": 2, "file_name": "ok2.png", "width": 64, "height": 48}]
    anns = [GOOD_BOX, {"id": 12, "image_id": 2, "category_id": 1, "bbox": [1, 1, 8, 8]}]
    ann_file, root = _dataset(tmp_path, images, anns)
    source = CocoSource(ann_file, root)
    errors = [e for e in source.read(2)]
    assert [(e.image_id, e.annotation_id, e.reason, e.path) for e in errors] == [
        (2, None, ErrorReason.DUPLICATE_IMAGE_ID, "ok.png"), (2, None, ErrorReason.DUPLICATE_IMAGE_ID, "ok2.png")]
    assert source.image_ids == [1, 2] and len(source) == 2
    _, records = _read(ann_file, root)
    assert sorted(records) == [1], "no image is audited against boxes that may be another's"


def test_annotations_that_share_an_id_are_all_rejected_and_their_image_still_audited(tmp_path: Path) -> None:
    copies = [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
              {"id": 10, "image_id": 1, "category_id": 1, "bbox": [20, 20, 5, 5]}]
    errors, records = _read(*_dataset(tmp_path, [OK_IMAGE], [*copies, GOOD_BOX]))
    assert errors == [(1, 10, ErrorReason.DUPLICATE_ANNOTATION_ID)] * 2
    assert records[1].annotation_ids == (11,)


@pytest.mark.parametrize(("key", "change", "shown"), [
    ("images", {"id": "1"}, "'1'"), ("images", {"id": 2 ** 63}, str(2 ** 63)), ("images", {"id": 1.0}, "1.0"),
    ("images", {"id": True}, "True"), ("images", {"id": None}, "None"), ("images", {"id": [1]}, "[1]"),
    ("annotations", {"id": "a11"}, "'a11'"), ("annotations", {"id": -2 ** 63 - 1}, str(-2 ** 63 - 1)),
    ("categories", {"id": {"n": 1}}, "{'n': 1}"), ("categories", {"name": None}, "None"),
])
def test_an_entry_id_that_is_no_int64_integer_fails_at_once_in_one_line(tmp_path: Path, key: str, change: dict,
                                                                         shown: str) -> None:
    """An entry's own id keys every row the audit stores (int64 columns); an exporter that writes string
    ids does so for the whole file, so it is the file that is refused, before any image is read."""
    entries = {"images": dict(OK_IMAGE), "annotations": dict(GOOD_BOX), "categories": {"id": 1, "name": "thing"}}
    entries[key] |= change
    ann_file, root = _dataset(tmp_path, [entries["images"]], [entries["annotations"]], [entries["categories"]])
    with pytest.raises(SourceFormatError) as info:
        CocoSource(ann_file, root)
    message = str(info.value)
    assert "\n" not in message and str(ann_file) in message and f"{key}[0]" in message and shown in message


def test_categories_that_repeat_an_id_fail_at_once(tmp_path: Path) -> None:
    ann_file, root = _dataset(tmp_path, [OK_IMAGE], [GOOD_BOX], [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(SourceFormatError, match=r"category id\(s\) \[1\] appear more than once"):
        CocoSource(ann_file, root)


@pytest.mark.parametrize(("change", "image_id"), [
    ({"category_id": [1]}, 1), ({"category_id": "1"}, 1), ({"category_id": True}, 1), ({"category_id": 1.0}, 1),
    ({"category_id": None}, 1), ({"image_id": "1"}, None), ({"image_id": [1]}, None), ({"image_id": None}, None),
    ({"image_id": 2 ** 64}, None), ({"image_id": False}, None),
])
def test_an_annotation_whose_references_are_no_int64_integers_is_an_error_row(tmp_path: Path, change: dict,
                                                                              image_id: int | None) -> None:
    """A reference (image or category id) that is not an id is a problem of its annotation alone: an error
    row, stored with its image when it names one, and the other annotations are read as usual."""
    bad = {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]} | change
    errors, records = _read(*_dataset(tmp_path, [OK_IMAGE], [bad, GOOD_BOX]))
    assert errors == [(image_id, 10, ErrorReason.MALFORMED_ANNOTATION)]
    assert records[1].annotation_ids == (11,)


def test_an_annotation_of_no_image_is_an_orphan_stored_with_its_image_id(tmp_path: Path) -> None:
    orphan = {"id": 10, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]}
    ann_file, root = _dataset(tmp_path, [OK_IMAGE], [orphan, GOOD_BOX])
    errors, records = _read(ann_file, root)
    assert errors == [(7, 10, ErrorReason.ORPHAN_ANNOTATION)] and records[1].annotation_ids == (11,)
    source = CocoSource(ann_file, root)
    assert [e.annotation_id for e in source.open_errors] == [10], "no image reads it: it comes with the opening"
    assert not any(isinstance(item, SourceError) for item in source.read(1))


@pytest.mark.parametrize("declared", [(100, 48), (48, 64), (64, None), ("64", "48")])
def test_a_declared_size_that_is_not_the_files_is_an_image_error(tmp_path: Path, declared: tuple) -> None:
    """Boxes are in the declared frame: in another one none of them can be placed, so the image is not audited."""
    image = OK_IMAGE | {"width": declared[0], "height": declared[1]}
    errors, records = _read(*_dataset(tmp_path, [image], [GOOD_BOX]))
    assert errors == [(1, None, ErrorReason.SIZE_MISMATCH)] and not records


def test_an_exif_turned_image_is_compared_by_its_displayed_size(tmp_path: Path) -> None:
    ann_file, root = _dataset(tmp_path, [], [])
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: the 64x48 pixels display as 48x64
    Image.new("RGB", (64, 48), "gray").save(root / "turned.jpg", exif=exif)
    for declared, expected in (((48, 64), []), ((64, 48), [(1, None, ErrorReason.SIZE_MISMATCH)])):
        image = {"id": 1, "file_name": "turned.jpg", "width": declared[0], "height": declared[1]}
        ann_file.write_text(json.dumps({"images": [image], "annotations": [], "categories": []}))
        assert _read(ann_file, root)[0] == expected, declared


@pytest.mark.parametrize("file_name", [None, 17, "", "ok\0.png", ["ok.png"]])
def test_a_file_name_that_is_no_path_is_an_image_error(tmp_path: Path, file_name: object) -> None:
    errors, records = _read(*_dataset(tmp_path, [OK_IMAGE | {"file_name": file_name}], [GOOD_BOX]))
    assert errors == [(1, None, ErrorReason.BAD_FILE_NAME)] and not records


def test_a_file_name_too_long_for_the_file_system_is_a_missing_file(tmp_path: Path) -> None:
    errors, _ = _read(*_dataset(tmp_path, [OK_IMAGE | {"file_name": "a" * 5000 + ".png"}], []))
    assert errors == [(1, None, ErrorReason.MISSING_FILE)]


def test_folder_source_reports_a_link_out_of_the_folder(tmp_path: Path) -> None:
    from eive_audit.pipeline.sources import FolderSource

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (folder / "b.png").symlink_to(tmp_path / "outside.png")
    items = list(FolderSource(folder))
    assert [(type(i).__name__, i.image_id) for i in items] == [("ImageRecord", 1), ("SourceError", 2)]
    assert items[1].reason is ErrorReason.PATH_ESCAPES_ROOT
