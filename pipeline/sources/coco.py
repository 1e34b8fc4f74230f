"""COCO-format datasets (annotation json + image root) as a stream of records and errors.

The json is read once. Structural problems fail at once with `SourceFormatError`: not json, not COCO, an
entry whose own id (image, annotation, category) is not an int64 integer (every table stores ids as int64,
and an exporter that writes string ids writes them for the whole file), or categories that repeat an id.
What concerns one image or one annotation becomes a `SourceError` and the stream goes on: repeated ids and
references that lead nowhere are screened out when the file is opened, before pycocotools indexes it (its
index silently keeps the last of repeated ids); the rest is checked against the image file when the image
is read.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pycocotools.coco import COCO

from eive_audit.pipeline.sources.decode import display_size
from eive_audit.pipeline.sources.records import ErrorReason, ImageRecord, ImageStream, SourceError, SourceFormatError

# Real COCO boxes overshoot the image by rounding; this much is clipped instead of rejected.
EDGE_TOLERANCE_PX = 1.0
_INT64 = np.iinfo(np.int64)


def is_int64(value: Any) -> bool:
    """An integer the int64 id columns can hold; json's `true` is an int to Python, but not an id."""
    return isinstance(value, int) and not isinstance(value, bool) and _INT64.min <= value <= _INT64.max


def _is_number(value: Any) -> bool:
    """An int or a float; json's `true` is an int to Python, but not a number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _to_float(value: int | float) -> float:
    """`value` as a float; an integer too large for one is infinite (json integers have no size limit)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SourceFormatError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SourceFormatError(f"{path}: not a COCO annotation file (top level is {type(data).__name__}, not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise SourceFormatError(f"{path}: not a COCO annotation file (missing list '{key}')")
    for key, fields in (("images", ("id", "file_name")), ("categories", ("id", "name")),
                        ("annotations", ("id", "image_id", "category_id", "bbox"))):
        for index, entry in enumerate(data[key]):
            if not isinstance(entry, dict) or any(f not in entry for f in fields):
                raise SourceFormatError(f"{path}: every entry of '{key}' needs the fields {list(fields)}; got {entry!r:.200}")
            if not is_int64(entry["id"]):
                raise SourceFormatError(f"{path}: {key}[{index}] has id {entry['id']!r:.100}; "
                                        "ids must be integers within int64")
    for index, category in enumerate(data["categories"]):
        if not isinstance(category["name"], str):
            raise SourceFormatError(f"{path}: categories[{index}] has name {category['name']!r:.100}, not a string")
    repeated = sorted(cat for cat, n in Counter(c["id"] for c in data["categories"]).items() if n > 1)
    if repeated:
        raise SourceFormatError(f"{path}: category id(s) {repeated[:10]} appear more than once in 'categories'")
    return data


def _link_error(ann: dict[str, Any], image_ids: Counter[int], copies: int) -> SourceError | None:
    """Why an annotation cannot be tied to one image and one category id, or None when it can."""
    ann_id, image_id = ann["id"], ann["image_id"]
    if not is_int64(image_id):
        return SourceError(None, ErrorReason.MALFORMED_ANNOTATION,
                           f"annotation {ann_id}: image_id {image_id!r:.100} is not an integer within int64",
                           annotation_id=ann_id)
    if image_id not in image_ids:
        return SourceError(image_id, ErrorReason.ORPHAN_ANNOTATION,
                           f"annotation {ann_id}: no entry of 'images' has id {image_id}", annotation_id=ann_id)
    if copies > 1:
        return SourceError(image_id, ErrorReason.DUPLICATE_ANNOTATION_ID,
                           f"annotation id {ann_id} is shared by {copies} annotations; every copy is left out",
                           annotation_id=ann_id)
    if not is_int64(ann["category_id"]):
        return SourceError(image_id, ErrorReason.MALFORMED_ANNOTATION,
                           f"annotation {ann_id}: category_id {ann['category_id']!r:.100} is not an integer within "
                           "int64", annotation_id=ann_id)
    return None


def _screen(data: dict[str, Any]) -> tuple[dict[str, Any], dict[int | None, list[SourceError]]]:
    """The dataset pycocotools may index, and the errors of the entries kept out of it, by image id.

    Entries of `images` that share an id are all kept out (one duplicate_image_id error each, their
    annotations with them: no box can be attributed to one of them); so is every copy of a repeated
    annotation id, and an annotation whose image or category id is malformed or names no image. The errors
    of annotations that belong to no image of the file are filed under None.
    """
    image_ids = Counter(image["id"] for image in data["images"])
    errors: dict[int | None, list[SourceError]] = defaultdict(list)
    for image in data["images"]:
        if image_ids[image["id"]] > 1:
            name = image["file_name"]
            errors[image["id"]].append(SourceError(
                image["id"], ErrorReason.DUPLICATE_IMAGE_ID,
                f"image id {image['id']} is shared by {image_ids[image['id']]} entries of 'images' (this one: "
                f"file_name {name!r:.200}); none of them is audited", path=name if isinstance(name, str) else None))
    copies = Counter(ann["id"] for ann in data["annotations"])
    kept = []
    for ann in data["annotations"]:
        error = _link_error(ann, image_ids, copies[ann["id"]])
        if error is not None:
            errors[error.image_id if error.image_id in image_ids else None].append(error)
        elif image_ids[ann["image_id"]] == 1:
            kept.append(ann)
    images = [image for image in data["images"] if image_ids[image["id"]] == 1]
    return {**data, "images": images, "annotations": kept}, dict(errors)


def safe_join(root: Path, relative: str) -> Path | None:
    """`root / relative` resolved, or None when it would escape `root` (absolute paths, `..`, symlinks).
    A symlink loop stays unresolved (os.path.realpath; Path.resolve raises on one) and is then no file."""
    root = root.resolve()
    candidate = Path(os.path.realpath(root / relative))
    return candidate if candidate.is_relative_to(root) else None


def _not_a_file(path: Path) -> str | None:
    """Why `path` is no image file to open, or None when it is a file."""
    try:
        return None if path.is_file() else f"image file not found: {path}"
    except OSError as exc:  # a name the file system refuses outright, e.g. one too long
        return f"image file not found: {str(path):.300} ({exc.strerror})"


class CocoSource(ImageStream):
    """Images and boxes of a COCO annotation file, with category names from its `categories`.

    `open_errors` are the errors found when the file was opened that belong to no image of it (orphan or
    malformed image references); `read` yields every other error with its image, so each is stored once.
    """

    def __init__(self, annotation_file: Path, image_root: Path) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_root = Path(image_root)
        raw = _load_json(self.annotation_file)
        self._image_ids = sorted({image["id"] for image in raw["images"]})
        self.dataset, self._errors = _screen(raw)
        self.open_errors: tuple[SourceError, ...] = tuple(self._errors.pop(None, ()))
        self.coco = COCO()
        self.coco.dataset = self.dataset
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            self.coco.createIndex()
        self.categories: dict[int, str] = {c["id"]: c["name"] for c in self.dataset["categories"]}

    @property
    def image_ids(self) -> list[int]:
        """Every id of `images`, once, sorted; a repeated id too (reading it yields its errors)."""
        return self._image_ids

    def read(self, image_id: int) -> Iterator[ImageRecord | SourceError]:
        """The record of one image, preceded by an error for each of its bad annotations; or its errors alone."""
        yield from self._errors.get(image_id, ())
        info = self.coco.imgs.get(image_id)
        if info is None:  # a repeated id: the errors of its entries are all there is
            return
        file_name = info["file_name"]
        if not isinstance(file_name, str) or not file_name or "\0" in file_name:
            yield SourceError(image_id, ErrorReason.BAD_FILE_NAME,
                              f"file_name {file_name!r:.200} is not a path (a non-empty string without NUL)")
            return
        path = safe_join(self.image_root, file_name)
        if path is None:
            yield SourceError(image_id, ErrorReason.PATH_ESCAPES_ROOT,
                              f"file_name {file_name!r} points outside the image root {self.image_root}",
                              path=file_name)
            return
        missing = _not_a_file(path)
        if missing:
            yield SourceError(image_id, ErrorReason.MISSING_FILE, missing, path=str(path))
            return
        try:
            width, height, orientation = display_size(path)  # as shown, which is what a COCO file declares
        except Exception as exc:  # PIL raises several types for corrupt files
            yield SourceError(image_id, ErrorReason.UNREADABLE_IMAGE, f"cannot read image {path}: {exc}", path=str(path))
            return
        declared = (info.get("width"), info.get("height"))
        if declared != (None, None) and declared != (width, height):
            # The boxes are in the declared frame, which is not this file's: none of them can be placed.
            yield SourceError(image_id, ErrorReason.SIZE_MISMATCH,
                              f"declared size {declared[0]!r:.20}x{declared[1]!r:.20} (width x height) is not the "
                              f"image's {width}x{height}", path=str(path))
            return
        boxes, labels, names, ann_ids, crowd = [], [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            checked = self._check_annotation(ann, width, height)
            if isinstance(checked, SourceError):
                yield checked
                continue
            boxes.append(checked)
            labels.append(ann["category_id"])
            names.append(self.categories[ann["category_id"]])
            ann_ids.append(int(ann["id"]))
            crowd.append(bool(ann.get("iscrowd", 0)))
        yield ImageRecord(
            image_id=int(image_id), path=path, width=width, height=height,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64), names=tuple(names), annotation_ids=tuple(ann_ids),
            crowd=np.asarray(crowd, dtype=bool), exif_orientation=orientation,
        )

    def _check_annotation(self, ann: dict[str, Any], width: int, height: int) -> list[float] | SourceError:
        """The annotation's xyxy box clipped by at most EDGE_TOLERANCE_PX, or the error that rejects it."""
        image_id, ann_id = int(ann["image_id"]), int(ann["id"])
        if ann["category_id"] not in self.categories:
            return SourceError(image_id, ErrorReason.UNKNOWN_CATEGORY,
                               f"annotation {ann_id}: unknown category id {ann['category_id']}", annotation_id=ann_id)
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            return SourceError(image_id, ErrorReason.MALFORMED_ANNOTATION,
                               f"annotation {ann_id}: bbox {bbox!r:.200} is not four numbers [x, y, w, h]",
                               annotation_id=ann_id)
        x, y, w, h = (_to_float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            return SourceError(image_id, ErrorReason.NON_FINITE_BOX,
                               f"annotation {ann_id}: box {bbox!r:.200} has a coordinate that is not finite",
                               annotation_id=ann_id)
        if not (w > 0 and h > 0):
            return SourceError(image_id, ErrorReason.DEGENERATE_BOX,
                               f"annotation {ann_id}: box {bbox} has non-positive size", annotation_id=ann_id)
        tol = EDGE_TOLERANCE_PX
        if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
            return SourceError(image_id, ErrorReason.BOX_OUT_OF_BOUNDS,
                               f"annotation {ann_id}: box {bbox} (xywh) leaves the {width}x{height} image",
                               annotation_id=ann_id)
        return [max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))]
