"""Classification sources (index JSON / CSV, ImageFolder tree): records, every bad input as a typed error or
a one-line format error naming file and line, and `open_source`'s dispatch. Tiny PNGs written per test."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from eive_audit.pipeline.sources import (CocoSource, ErrorReason, FolderSource, ImageFolderSource, ImageRecord,
                                         IndexSource, SourceError, SourceFormatError, open_source)

W, H = 64, 48  # every test image is W x H
GOOD = {"id": 1, "file": "ok.png", "label": "circle", "boxes": [[1, 2, 20, 30]]}


def _root(tmp_path: Path) -> Path:
    """An image root holding `ok.png`, `ok2.png` and `ok3.png` (W x H) and, beside it, `outside.png`."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    for name in ("ok.png", "ok2.png", "ok3.png"):
        Image.new("RGB", (W, H), "gray").save(root / name)
    Image.new("RGB", (W, H), "gray").save(tmp_path / "outside.png")
    return root


def _json(tmp_path: Path, images: list[dict], **extra: object) -> tuple[Path, Path]:
    root = _root(tmp_path)
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"images": images, **extra}))
    return index, root


def _csv(tmp_path: Path, text: str) -> tuple[Path, Path]:
    root = _root(tmp_path)
    index = tmp_path / "index.csv"
    index.write_text(text)
    return index, root


Found = tuple[int | None, int | None, ErrorReason]  # (image id, annotation id, reason) of an error


def _read(source: IndexSource | ImageFolderSource) -> tuple[list[Found], dict[int, ImageRecord]]:
    """Every error of a full pass as (image id, annotation id, reason), in stream order, and the records by id."""
    items = list(source)
    errors = [(e.image_id, e.annotation_id, e.reason) for e in items if isinstance(e, SourceError)]
    return errors, {r.image_id: r for r in items if isinstance(r, ImageRecord)}


def _fields(record: ImageRecord) -> tuple:
    return (record.image_id, record.path, record.width, record.height, record.boxes.tolist(), record.labels.tolist(),
            record.names, record.annotation_ids, record.class_label, record.class_name)


# --- records ---

def test_json_and_csv_indexes_give_the_same_records(tmp_path: Path) -> None:
    images = [{"file": "ok.png", "label": "square", "boxes": [[1, 2, 20, 30], [30.5, 4, 60, 40]]},
              {"file": "ok2.png", "label": "circle"},
              {"file": "ok3.png", "label": "square", "boxes": [[0, 0, 64, 48]]}]
    index, root = _json(tmp_path, images)
    (tmp_path / "index.csv").write_text("file,label,x0,y0,x1,y1\n"
                                        "ok.png,square,1,2,20,30\nok2.png,circle,,,,\n"
                                        "ok.png,square,30.5,4,60,40\n\nok3.png, square,0,0,64,48\n")
    from_json, from_csv = IndexSource(index, root), IndexSource(tmp_path / "index.csv", root)
    assert from_json.categories == from_csv.categories == {0: "circle", 1: "square"}  # sorted distinct labels
    json_items, csv_items = list(from_json), list(from_csv)
    assert [_fields(r) for r in json_items] == [_fields(r) for r in csv_items]
    first = json_items[0]
    assert first.image_id == 1 and first.class_label == 1 and first.class_name == "square"
    assert first.boxes.dtype == np.float32 and first.boxes.tolist() == [[1, 2, 20, 30], [30.5, 4, 60, 40]]
    assert first.labels.tolist() == [1, 1] and first.names == ("square", "square") and first.annotation_ids == (0, 1)
    assert (first.width, first.height, first.path) == (W, H, (root / "ok.png").resolve())
    assert len(json_items[1].boxes) == 0 and json_items[1].class_label == 0
    assert from_json.image_ids == [1, 2, 3] and len(from_json) == 3 and from_json.open_errors == ()


def test_classes_fix_the_category_ids_and_ids_may_be_given(tmp_path: Path) -> None:
    images = [{"id": 40, "file": "ok.png", "label": "circle"}, {"id": 7, "file": "ok2.png", "label": "hexagon"}]
    source = IndexSource(*_json(tmp_path, images, classes=["hexagon", "circle", "square"], cues=[], synthetic={}))
    assert source.categories == {0: "hexagon", 1: "circle", 2: "square"} and source.image_ids == [7, 40]
    assert [(r.image_id, r.class_label, r.class_name) for r in source] == [(7, 0, "hexagon"), (40, 1, "circle")]


def test_the_size_is_the_displayed_one(tmp_path: Path) -> None:
    root = _root(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: the W x H pixels display as H x W
    Image.new("RGB", (W, H), "gray").save(root / "turned.jpg", exif=exif)
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"images": [{"file": "turned.jpg", "label": "a", "boxes": [[0, 0, H, W]]}]}))
    (record,) = IndexSource(index, root)
    assert (record.width, record.height, record.exif_orientation) == (H, W, 6) and record.annotation_ids == (0,)


def test_record_class_label_and_name_come_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both or neither"):
        ImageRecord(image_id=1, path=tmp_path, width=1, height=1, class_label=0)


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for rel in ("dog/b.png", "cat/x.png", "dog/sub/a.png", "stray.png", "cat/notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            Image.new("RGB", (W, H)).save(root / rel)
        else:
            (root / rel).write_text("not an image")
    (root / "empty").mkdir()  # holds no image: no class
    return root


def test_image_folder_labels_are_the_sorted_class_folders(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    source = ImageFolderSource(root)
    assert source.categories == {0: "cat", 1: "dog"} and source.image_ids == [1, 2, 3, 4]
    errors, records = _read(source)
    assert [(r.path.relative_to(root).as_posix(), r.class_label, r.class_name) for r in records.values()] == [
        ("cat/x.png", 0, "cat"), ("dog/b.png", 1, "dog"), ("dog/sub/a.png", 1, "dog")]
    assert sorted(records) == [1, 2, 3] and all(len(r.boxes) == 0 and (r.width, r.height) == (W, H)
                                                for r in records.values())
    assert errors == [(4, None, ErrorReason.UNKNOWN_CATEGORY)], "an image in no class folder is a row, not a gap"


def test_image_folder_links_broken_files_and_a_tree_without_classes(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (root / "cat" / "y.png").symlink_to(tmp_path / "outside.png")
    (root / "dog" / "broken.png").write_bytes(b"nope")
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "e.png")
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # a class folder that is a link out of the tree
    errors, records = _read(ImageFolderSource(root))
    assert errors == [(2, None, ErrorReason.PATH_ESCAPES_ROOT), (4, None, ErrorReason.UNREADABLE_IMAGE),
                      (6, None, ErrorReason.PATH_ESCAPES_ROOT), (7, None, ErrorReason.UNKNOWN_CATEGORY)]
    assert sorted(records) == [1, 3, 5]
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(SourceFormatError, match=r"no class folder holding an image"):
        ImageFolderSource(flat)
    with pytest.raises(NotADirectoryError):
        ImageFolderSource(tmp_path / "nowhere")


# --- bad content: typed error rows, and the run goes on ---

def _link_out(tmp_path: Path) -> str:
    (tmp_path / "images" / "out.png").symlink_to(tmp_path / "outside.png")
    return "out.png"


@pytest.mark.parametrize(("file", "reason"), [
    ("nowhere.png", ErrorReason.MISSING_FILE), ("a" * 5000 + ".png", ErrorReason.MISSING_FILE),
    ("../outside.png", ErrorReason.PATH_ESCAPES_ROOT), ("sub/../../outside.png", ErrorReason.PATH_ESCAPES_ROOT),
    ("ABSOLUTE", ErrorReason.PATH_ESCAPES_ROOT), ("LINK_OUT", ErrorReason.PATH_ESCAPES_ROOT),
    ("BROKEN", ErrorReason.UNREADABLE_IMAGE),
    (None, ErrorReason.BAD_FILE_NAME), (17, ErrorReason.BAD_FILE_NAME), ("", ErrorReason.BAD_FILE_NAME),
    ("ok\0.png", ErrorReason.BAD_FILE_NAME), (["ok.png"], ErrorReason.BAD_FILE_NAME),
])
def test_an_image_whose_file_cannot_be_read_is_an_image_error(tmp_path: Path, file: object,
                                                              reason: ErrorReason) -> None:
    root = _root(tmp_path)
    if file == "ABSOLUTE":
        file = str(tmp_path / "outside.png")
    elif file == "LINK_OUT":
        file = _link_out(tmp_path)
    elif file == "BROKEN":
        (root / "broken.png").write_bytes(b"\x89PNG not really")
        file = "broken.png"
    index, root = _json(tmp_path, [{"file": file, "label": "circle"}, {**GOOD, "id": 2}])
    errors, records = _read(IndexSource(index, root))
    assert errors == [(1, None, reason)] and sorted(records) == [2], "the next image is still read"


@pytest.mark.parametrize(("label", "reason"), [
    ("dodecagon", ErrorReason.UNKNOWN_CATEGORY), ("", ErrorReason.MALFORMED_ANNOTATION),
    (None, ErrorReason.MALFORMED_ANNOTATION), (3, ErrorReason.MALFORMED_ANNOTATION),
    (["circle"], ErrorReason.MALFORMED_ANNOTATION),
])
def test_an_image_whose_label_is_no_class_is_an_image_error(tmp_path: Path, label: object,
                                                            reason: ErrorReason) -> None:
    index, root = _json(tmp_path, [{"file": "ok2.png", "label": label}, {**GOOD, "id": 2}], classes=["circle"])
    source = IndexSource(index, root)
    (error,) = [e for e in source.read(1)]
    assert (error.image_id, error.annotation_id, error.reason) == (1, None, reason) and "images[0]" in error.message
    assert [type(item) for item in source.read(2)] == [ImageRecord]


@pytest.mark.parametrize(("box", "reason"), [
    ([40, 30, 70, 47], ErrorReason.BOX_OUT_OF_BOUNDS), ([-2, 0, 5, 5], ErrorReason.BOX_OUT_OF_BOUNDS),
    ([10, 10, 10, 20], ErrorReason.DEGENERATE_BOX), ([10, 20, 30, 5], ErrorReason.DEGENERATE_BOX),
    ([float("nan"), 1, 5, 5], ErrorReason.NON_FINITE_BOX), ([1, 1, float("inf"), 5], ErrorReason.NON_FINITE_BOX),
    ([1, 1, 10 ** 400, 5], ErrorReason.NON_FINITE_BOX),  # a json integer too large for a float
    ([True, 1, 5, 5], ErrorReason.MALFORMED_ANNOTATION), (["1", 1, 5, 5], ErrorReason.MALFORMED_ANNOTATION),
    ([1, 2, 3], ErrorReason.MALFORMED_ANNOTATION), ({"x0": 1}, ErrorReason.MALFORMED_ANNOTATION),
    (None, ErrorReason.MALFORMED_ANNOTATION),
])
def test_a_bad_box_is_an_annotation_error_and_its_image_is_audited_with_the_good_ones(
        tmp_path: Path, box: object, reason: ErrorReason) -> None:
    image = {"file": "ok.png", "label": "circle", "boxes": [[1, 1, 8, 8], box, [-0.5, 0, 64.5, 48]]}
    errors, records = _read(IndexSource(*_json(tmp_path, [image, {**GOOD, "id": 2}])))
    assert errors == [(1, 1, reason)]
    assert records[1].annotation_ids == (0, 2) and records[1].boxes.tolist() == [[1, 1, 8, 8], [0, 0, W, H]]
    assert sorted(records) == [1, 2]


def test_entries_that_share_an_id_are_each_an_error_and_none_is_audited(tmp_path: Path) -> None:
    images = [{"id": 2, "file": "ok.png", "label": "circle"}, {"id": 2, "file": "ok2.png", "label": "circle"},
              {"file": "ok3.png", "label": "circle"}]  # no id: its position, 3
    source = IndexSource(*_json(tmp_path, images))
    assert [(e.image_id, e.reason, e.path) for e in source.read(2)] == [
        (2, ErrorReason.DUPLICATE_IMAGE_ID, "ok.png"), (2, ErrorReason.DUPLICATE_IMAGE_ID, "ok2.png")]
    assert source.image_ids == [2, 3] and sorted(_read(source)[1]) == [3]


def test_csv_bad_values_are_rows_like_the_jsons(tmp_path: Path) -> None:
    text = ("file,label,x0,y0,x1,y1,note\n"
            "ok.png,circle,nan,1,5,5,x\nok.png,circle,1,1,8,8,\n,circle,,,,,\n../outside.png,square,,,,,\n"
            "ok2.png,square,5,5,5,9,\nok3.png,square,0,0,99,9,\n")
    errors, records = _read(IndexSource(*_csv(tmp_path, text)))
    assert errors == [(1, 0, ErrorReason.NON_FINITE_BOX), (2, None, ErrorReason.BAD_FILE_NAME),
                      (3, None, ErrorReason.PATH_ESCAPES_ROOT), (4, 0, ErrorReason.DEGENERATE_BOX),
                      (5, 0, ErrorReason.BOX_OUT_OF_BOUNDS)]
    assert records[1].annotation_ids == (1,) and sorted(records) == [1, 4, 5]


# --- a malformed index fails at once, naming the file and the line or entry ---

@pytest.mark.parametrize(("content", "problem"), [
    ('{"images": [\n  {"file": "ok.png", "label": "a"},\n  oops\n]}', "line 3: not valid JSON"),
    ("", "line 1: not valid JSON"),
    ("[1, 2]", "top level is list"),
    ('{"classes": ["a"]}', "'images' is None, not a list"),
    ('{"images": {"file": "ok.png"}}', "not a list"),
    ('{"images": [{"file": "ok.png", "label": "a"}, "ok2.png"]}', "images[1] is 'ok2.png'"),
    ('{"images": [{"file": "ok.png"}]}', "images[0] is {'file': 'ok.png'}; every entry"),
    ('{"images": [{"id": "1", "file": "ok.png", "label": "a"}]}', "images[0] has id '1'; ids must be integers"),
    ('{"images": [{"id": 1.0, "file": "ok.png", "label": "a"}]}', "images[0] has id 1.0"),
    ('{"images": [{"id": true, "file": "ok.png", "label": "a"}]}', "images[0] has id True"),
    ('{"images": [{"file": "ok.png", "label": "a", "boxes": {"x0": 1}}]}', "images[0] has boxes {'x0': 1}, not a list"),
    ('{"images": [], "classes": "abc"}', "'classes' is 'abc', not a list"),
    ('{"images": [], "classes": ["a", "b", "a"]}', "class name(s) ['a'] appear more than once"),
])
def test_a_malformed_json_index_fails_at_once_naming_the_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SourceFormatError) as info:
        IndexSource(path, _root(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


@pytest.mark.parametrize(("content", "problem"), [
    ("", "line 1: empty file"),
    ("path,class\nok.png,a\n", "line 1: header ['path', 'class'] is not an index header (no column(s) ['file', "
                               "'label'])"),
    ("file,label,x0,y0\nok.png,a,1,1\n", "line 1: header ['file', 'label', 'x0', 'y0'] is not an index header (box "
                                         "columns ['x0', 'y0'] without ['x1', 'y1'])"),
    ("file,label,file\nok.png,a,b.png\n", "(column(s) ['file'] repeated)"),
    ("file,label\nok.png,a\nok2.png,a,extra\n", "line 3: 3 fields, the header has 2"),
    ("file,label\nok.png,a\n\nok2.png\n", "line 4: 1 fields, the header has 2"),
    ("file,label,x0,y0,x1,y1\nok.png,a,1,1,5,5\nok.png,a,1,1,5,\nok2.png,a,1,one,5,5\n",
     "line 3: box ['1', '1', '5', ''] (x0, y0, x1, y1) is not four numbers"),
    ("file,label,x0,y0,x1,y1\nok.png,a,1,1,5,5\nok2.png,a,1,one,5,5\n", "line 3: box ['1', 'one', '5', '5']"),
    ("file,label\nok.png,a\nok2.png,b\nok.png,b\n", "line 4: file 'ok.png' has label 'b', but line 2 gave it 'a'"),
    ('file,label\nok.png,a\n"ok2.png,a\n', "not a CSV row"),
])
def test_a_malformed_csv_index_fails_at_once_naming_file_and_line(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(SourceFormatError) as info:
        IndexSource(path, _root(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_an_index_that_is_no_text_or_no_index_file_fails_at_once(tmp_path: Path) -> None:
    root = _root(tmp_path)
    binary = tmp_path / "index.csv"
    binary.write_bytes(b"file,label\nok.png,a\nok2.png,\xff\xfe\n")
    with pytest.raises(SourceFormatError, match=r"index.csv: line 3: not UTF-8 text"):
        IndexSource(binary, root)
    with pytest.raises(SourceFormatError, match="index file not found"):
        IndexSource(tmp_path / "nope.json", root)
    (tmp_path / "index.txt").write_text("file,label\n")
    with pytest.raises(SourceFormatError, match=r"index.txt: an index is a .json or .csv file"):
        IndexSource(tmp_path / "index.txt", root)


# --- open_source ---

def test_open_source_dispatches_on_the_task_and_caches_per_index_stamp(tmp_path: Path) -> None:
    index, root = _json(tmp_path, [GOOD])
    opened = open_source(root, None, index, "classify")
    assert isinstance(opened, IndexSource) and open_source(root, index=index, task="classify") is opened
    index.write_text(json.dumps({"images": [GOOD, {**GOOD, "id": 2}]}))  # changed: parsed again
    assert open_source(root, None, index, "classify").image_ids == [1, 2]
    tree = _tree(tmp_path)
    assert isinstance(open_source(tree, task="classify"), ImageFolderSource)
    assert isinstance(open_source(tree), FolderSource) and isinstance(open_source(tree, None), FolderSource)
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    assert isinstance(open_source(root, coco), CocoSource)  # the detection callers' positional form
    with pytest.raises(ValueError, match="reads --index"):
        open_source(root, coco, None, "classify")
    with pytest.raises(ValueError, match="reads --coco"):
        open_source(root, None, index, "detect")
    with pytest.raises(ValueError, match="task must be"):
        open_source(root, task="segment")


# --- property: CSV rows with random valid boxes round-trip ---

_BOX = st.tuples(st.integers(0, W - 1), st.integers(0, H - 1), st.integers(1, W), st.integers(1, H)).map(
    lambda b: (min(b[0], b[2] - 1), min(b[1], b[3] - 1), b[2], b[3]))
_ROWS = st.lists(st.tuples(st.sampled_from(["ok.png", "ok2.png", "ok3.png"]), st.one_of(st.none(), _BOX)),
                 min_size=1, max_size=12)


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _root(tmp_path_factory.mktemp("classify_roundtrip"))


@settings(max_examples=40, deadline=None)
@given(rows=_ROWS, labels=st.dictionaries(st.sampled_from(["ok.png", "ok2.png", "ok3.png"]),
                                          st.sampled_from(["b c", "a,b", 'q"t', "z"]), min_size=3))
def test_csv_rows_with_valid_boxes_round_trip(shared_root: Path, rows: list, labels: dict) -> None:
    """Each file's boxes come back in row order with its class; ids follow first appearance."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["label", *("x0", "y0", "x1", "y1"), "file"])
    for file, box in rows:
        writer.writerow([labels[file], *(box if box is not None else ("",) * 4), file])
    index = shared_root.parent / "roundtrip.csv"
    index.write_text(out.getvalue())
    source = IndexSource(index, shared_root)
    files = list(dict.fromkeys(file for file, _ in rows))
    classes = sorted({labels[file] for file in files})
    assert source.categories == dict(enumerate(classes))
    records = list(source)
    assert [r.path.name for r in records] == files and [r.image_id for r in records] == list(range(1, len(files) + 1))
    for record in records:
        expected = [list(box) for file, box in rows if file == record.path.name and box is not None]
        assert record.boxes.tolist() == expected and record.annotation_ids == tuple(range(len(expected)))
        assert record.class_name == labels[record.path.name] and record.class_label == classes.index(record.class_name)
        assert record.labels.tolist() == [record.class_label] * len(expected)
