"""Classification datasets as a stream of records and errors: an index (JSON or CSV of file, label and
optional object boxes) over an image root, or an ImageFolder tree `root/<class>/<image>`.

The bad-input rules are the COCO source's. An index that is not one (not JSON or CSV, the wrong shape, a
CSV row that cannot be parsed) fails at once with `SourceFormatError` naming the file and the line or
entry, before any image is read: a file with one unparseable row was written by a broken exporter, and
guessing what the row meant would audit images against labels nobody gave. What concerns one image (its
file, its label) or one of its boxes becomes a `SourceError` and the stream goes on; an image with a bad
box is still audited with its good ones. File names never reach outside the image root.

JSON index: `{"classes": [...], "images": [{"id", "file", "label", "boxes"}], ...}`; `classes` (optional,
else the sorted distinct labels) fixes the category ids 0..C-1 in its order, `id` is optional (else the
1-based position), `boxes` optional absolute pixel xyxy; other keys (`cues`, `synthetic`) are ignored here.
CSV index: a header naming the columns `file` and `label`, optionally all of `x0, y0, x1, y1`; the rows of
one file add its boxes (a row with four empty box cells adds none) and must agree on its label, ids are 1-based
positions in the order files first appear, classes the sorted distinct labels. Other columns are ignored, and
so are spaces after a comma (`a.png, cat`), as hand-written files have them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from eive_audit.pipeline.sources.coco import (EDGE_TOLERANCE_PX, _is_number, _not_a_file, _to_float, is_int64,
                                              safe_join)
from eive_audit.pipeline.sources.decode import display_size
from eive_audit.pipeline.sources.folder import IMAGE_SUFFIXES
from eive_audit.pipeline.sources.records import ErrorReason, ImageRecord, ImageStream, SourceError, SourceFormatError

BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class _Entry:
    """One image of an index as written: `file`, `label` and `boxes` unchecked (they become error rows at
    read); `where` names it in messages (`images[3]` of a JSON, `line 5` of a CSV)."""

    image_id: int
    file: object
    label: object
    boxes: tuple[object, ...]
    where: str


def _text(path: Path) -> str:
    """The file as text (UTF-8, a byte-order mark dropped); SourceFormatError naming the line of a bad byte."""
    if not path.is_file():
        raise SourceFormatError(f"{path}: index file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SourceFormatError(f"{path}: line {line}: not UTF-8 text ({exc.reason})") from exc


def _classes(path: Path, given: object, labels: list[object]) -> tuple[str, ...]:
    """The class names in category-id order: `given` (a list of distinct strings), or the sorted distinct
    labels that are names."""
    if given is None:
        return tuple(sorted({label for label in labels if isinstance(label, str) and label}))
    if not (isinstance(given, list) and all(isinstance(name, str) and name for name in given)):
        raise SourceFormatError(f"{path}: 'classes' is {given!r:.200}, not a list of non-empty strings")
    repeated = sorted(name for name, n in Counter(given).items() if n > 1)
    if repeated:
        raise SourceFormatError(f"{path}: class name(s) {repeated[:10]} appear more than once in 'classes'")
    return tuple(given)


def _json_index(path: Path) -> tuple[tuple[str, ...], list[_Entry]]:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as exc:
        raise SourceFormatError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise SourceFormatError(f"{path}: not a classification index (top level is {type(data).__name__}, "
                                "not an object)")
    images = data.get("images")
    if not isinstance(images, list):
        raise SourceFormatError(f"{path}: not a classification index ('images' is {images!r:.100}, not a list)")
    entries = []
    for index, image in enumerate(images):
        where = f"images[{index}]"
        if not isinstance(image, dict) or "file" not in image or "label" not in image:
            raise SourceFormatError(f"{path}: {where} is {image!r:.200}; every entry of 'images' is an object "
                                    "with the fields 'file' and 'label'")
        image_id = image.get("id", index + 1)
        if not is_int64(image_id):
            raise SourceFormatError(f"{path}: {where} has id {image_id!r:.100}; ids must be integers within int64")
        boxes = image.get("boxes")
        boxes = [] if boxes is None else boxes
        if not isinstance(boxes, list):
            raise SourceFormatError(f"{path}: {where} has boxes {boxes!r:.200}, not a list of [x0, y0, x1, y1]")
        entries.append(_Entry(image_id, image["file"], image["label"], tuple(boxes), where))
    return _classes(path, data.get("classes"), [entry.label for entry in entries]), entries


def _csv_header(path: Path, header: list[str]) -> tuple[int, int, tuple[int, ...]]:
    """Positions of the `file` and `label` columns and of the box columns (none or all four)."""
    names = [name.strip() for name in header]
    known = [name for name in names if name in ("file", "label", *BOX_COLUMNS)]
    repeated = sorted(name for name, n in Counter(known).items() if n > 1)
    missing = [name for name in ("file", "label") if name not in names]
    boxes = [name for name in BOX_COLUMNS if name in names]
    if repeated or missing or len(boxes) not in (0, 4):
        problem = (f"column(s) {repeated} repeated" if repeated else f"no column(s) {missing}" if missing
                   else f"box columns {boxes} without {[name for name in BOX_COLUMNS if name not in boxes]}")
        raise SourceFormatError(f"{path}: line 1: header {names!r:.300} is not an index header ({problem}); it "
                                "names the columns file and label, optionally all of x0, y0, x1, y1")
    return names.index("file"), names.index("label"), tuple(names.index(name) for name in boxes)


def _csv_box(path: Path, line: int, cells: list[str]) -> tuple[float, ...] | None:
    """A row's box as four floats (a NaN or infinite one is a row's error later), None when all four cells are
    empty; SourceFormatError when a cell is no number."""
    cells = [cell.strip() for cell in cells]
    if not any(cells):
        return None
    try:
        return tuple(float(cell) for cell in cells)
    except ValueError:
        raise SourceFormatError(f"{path}: line {line}: box {cells} (x0, y0, x1, y1) is not four numbers") from None


def _csv_index(path: Path) -> tuple[tuple[str, ...], list[_Entry]]:
    reader = csv.reader(io.StringIO(_text(path), newline=""), skipinitialspace=True, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise SourceFormatError(f"{path}: line 1: empty file; an index CSV starts with a header naming the "
                                    "columns file and label")
        file_col, label_col, box_cols = _csv_header(path, header)
        first: dict[str, tuple[int, str, int]] = {}  # file -> (image id, label, line of its first row)
        boxes: dict[str, list[object]] = defaultdict(list)
        for row in reader:
            line = reader.line_num
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                raise SourceFormatError(f"{path}: line {line}: {len(row)} fields, the header has {len(header)}")
            file, label = row[file_col], row[label_col]
            image_id, first_label, first_line = first.setdefault(file, (len(first) + 1, label, line))
            if label != first_label:
                raise SourceFormatError(f"{path}: line {line}: file {file!r:.200} has label {label!r:.100}, but "
                                        f"line {first_line} gave it {first_label!r:.100}")
            box = _csv_box(path, line, [row[col] for col in box_cols]) if box_cols else None
            if box is not None:
                boxes[file].append(box)
    except csv.Error as exc:
        raise SourceFormatError(f"{path}: line {reader.line_num}: not a CSV row ({exc})") from exc
    entries = [_Entry(image_id, file, label, tuple(boxes[file]), f"line {line}")
               for file, (image_id, label, line) in first.items()]
    return _classes(path, None, [entry.label for entry in entries]), entries


def _check_box(box: object, position: int, image_id: int, width: int, height: int,
               where: str) -> list[float] | SourceError:
    """An xyxy box clipped to the image by at most EDGE_TOLERANCE_PX, or the error that rejects it."""
    def error(reason: ErrorReason, problem: str) -> SourceError:
        return SourceError(image_id, reason, f"{where}: box {position} {box!r:.200} {problem}", annotation_id=position)

    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
        return error(ErrorReason.MALFORMED_ANNOTATION, "is not four numbers [x0, y0, x1, y1]")
    x0, y0, x1, y1 = (_to_float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return error(ErrorReason.NON_FINITE_BOX, "has a coordinate that is not finite")
    if not (x1 > x0 and y1 > y0):
        return error(ErrorReason.DEGENERATE_BOX, "has non-positive size")
    tol = EDGE_TOLERANCE_PX
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        return error(ErrorReason.BOX_OUT_OF_BOUNDS, f"(xyxy) leaves the {width}x{height} image")
    return [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))]


def _image_size(image_id: int, path: Path) -> tuple[int, int, int | None] | SourceError:
    """The display size of an image file, or the error that stops its image."""
    missing = _not_a_file(path)
    if missing:
        return SourceError(image_id, ErrorReason.MISSING_FILE, missing, path=str(path))
    try:
        return display_size(path)
    except Exception as exc:  # PIL raises several types for corrupt files
        return SourceError(image_id, ErrorReason.UNREADABLE_IMAGE, f"cannot read image {path}: {exc}", path=str(path))


class IndexSource(ImageStream):
    """Images of a classification index (`.json` or `.csv`, by suffix) under `image_root`, each with its
    class and object boxes; `categories` are category id -> class name, ids 0..C-1 in `classes` order.

    Entries that share an id are each a duplicate_image_id row and none is audited, as in the COCO source.
    Every error belongs to an image, so `open_errors` stays ImageStream's empty default.
    """

    def __init__(self, index: Path, image_root: Path) -> None:
        self.index = Path(index)
        self.image_root = Path(image_root)
        readers = {".json": _json_index, ".csv": _csv_index}
        if self.index.suffix.lower() not in readers:
            raise SourceFormatError(f"{self.index}: an index is a .json or .csv file")
        classes, entries = readers[self.index.suffix.lower()](self.index)
        self.categories: dict[int, str] = dict(enumerate(classes))
        self._class_ids = {name: i for i, name in self.categories.items()}
        copies = Counter(entry.image_id for entry in entries)
        self._entries = {entry.image_id: entry for entry in entries if copies[entry.image_id] == 1}
        self._errors: dict[int, list[SourceError]] = defaultdict(list)
        for entry in entries:
            if copies[entry.image_id] > 1:
                self._errors[entry.image_id].append(SourceError(
                    entry.image_id, ErrorReason.DUPLICATE_IMAGE_ID,
                    f"{entry.where}: image id {entry.image_id} is shared by {copies[entry.image_id]} entries (this "
                    f"one: file {entry.file!r:.200}); none of them is audited",
                    path=entry.file if isinstance(entry.file, str) else None))
        self._image_ids = sorted(copies)

    @property
    def image_ids(self) -> list[int]:
        """Every image id of the index, once, sorted; a repeated id too (reading it yields its errors)."""
        return self._image_ids

    def read(self, image_id: int) -> Iterator[ImageRecord | SourceError]:
        """The record of one image, preceded by an error for each of its bad boxes; or its errors alone."""
        yield from self._errors.get(image_id, ())
        entry = self._entries.get(image_id)
        if entry is None:  # a repeated id: the errors of its entries are all there is
            return
        file = entry.file
        if not isinstance(file, str) or not file or "\0" in file:
            yield SourceError(image_id, ErrorReason.BAD_FILE_NAME,
                              f"{entry.where}: file {file!r:.200} is not a path (a non-empty string without NUL)")
            return
        path = safe_join(self.image_root, file)
        if path is None:
            yield SourceError(image_id, ErrorReason.PATH_ESCAPES_ROOT,
                              f"{entry.where}: file {file!r:.300} points outside the image root {self.image_root}",
                              path=file)
            return
        size = _image_size(image_id, path)
        if isinstance(size, SourceError):
            yield size
            return
        width, height, orientation = size
        label = entry.label
        if not isinstance(label, str) or not label:
            yield SourceError(image_id, ErrorReason.MALFORMED_ANNOTATION,
                              f"{entry.where}: label {label!r:.100} is not a class name (a non-empty string)",
                              path=str(path))
            return
        if label not in self._class_ids:
            yield SourceError(image_id, ErrorReason.UNKNOWN_CATEGORY,
                              f"{entry.where}: label {label!r:.100} is not one of the classes "
                              f"{list(self.categories.values())!r:.300}", path=str(path))
            return
        boxes, positions = [], []
        for position, box in enumerate(entry.boxes):
            checked = _check_box(box, position, image_id, width, height, entry.where)
            if isinstance(checked, SourceError):
                yield checked
                continue
            boxes.append(checked)
            positions.append(position)
        class_id = self._class_ids[label]
        yield ImageRecord(
            image_id=image_id, path=path, width=width, height=height,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.full(len(boxes), class_id, dtype=np.int64), names=(label,) * len(boxes),
            annotation_ids=tuple(positions), exif_orientation=orientation, class_label=class_id, class_name=label,
        )


class ImageFolderSource(ImageStream):
    """An ImageFolder tree `root/<class>/<image>` (torchvision's layout): the classes are the immediate
    subfolders holding an image (at any depth below them), sorted by name, category ids 0..C-1 in that order.

    Every image file under `root` has an id, its 1-based position in sorted path order. An image directly in
    `root` has no class: it is an unknown_category row rather than left out, so a misplaced file shows in the
    errors table; a tree with no class folder at all is no ImageFolder tree and fails at once
    (SourceFormatError). A class folder may be a symlink (followed; deeper ones are not, so a link loop ends);
    a file that resolves outside `root` is a path_escapes_root row. Records have no boxes.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder not found: {self.root}")
        top = sorted(self.root.iterdir())
        found = [p for folder in top if folder.is_dir() for p in folder.rglob("*")] + top
        self.paths = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        classes = sorted({p.relative_to(self.root).parts[0] for p in self.paths if p.parent != self.root})
        if not classes:
            raise SourceFormatError(f"{self.root}: no class folder holding an image; an ImageFolder tree is "
                                    f"{self.root}/<class>/<image> (or give a classification index)")
        self.categories: dict[int, str] = dict(enumerate(classes))
        self._class_ids = {name: i for i, name in self.categories.items()}

    @property
    def image_ids(self) -> list[int]:
        return list(range(1, len(self.paths) + 1))

    def read(self, image_id: int) -> Iterator[ImageRecord | SourceError]:
        """The record of one image, or the error that stops it."""
        path = self.paths[image_id - 1]
        if not path.resolve().is_relative_to(self.root.resolve()):  # a symlink out of the tree
            yield SourceError(image_id, ErrorReason.PATH_ESCAPES_ROOT,
                              f"{path} links outside the image folder {self.root}", str(path))
            return
        if path.parent == self.root:
            yield SourceError(image_id, ErrorReason.UNKNOWN_CATEGORY,
                              f"{path} lies in no class folder; an ImageFolder tree is {self.root}/<class>/<image>",
                              str(path))
            return
        size = _image_size(image_id, path)
        if isinstance(size, SourceError):
            yield size
            return
        width, height, orientation = size
        name = path.relative_to(self.root).parts[0]
        yield ImageRecord(image_id=image_id, path=path, width=width, height=height, exif_orientation=orientation,
                          class_label=self._class_ids[name], class_name=name)
