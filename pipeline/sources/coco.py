"""COCO-format datasets (annotation json + image root) as a stream of records and errors.

The json is read once and indexed by pycocotools. Structural problems (not json, not COCO) fail at once;
problems of one image or one annotation become `SourceError`s and the stream goes on.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from eive_audit.pipeline.sources.records import ErrorReason, ImageRecord, SourceError, SourceFormatError

# Real COCO boxes overshoot the image by rounding; this much is clipped instead of rejected.
EDGE_TOLERANCE_PX = 1.0


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
        for entry in data[key]:
            if not isinstance(entry, dict) or any(f not in entry for f in fields):
                raise SourceFormatError(f"{path}: every entry of '{key}' needs the fields {list(fields)}; got {entry!r:.200}")
    return data


def safe_join(root: Path, relative: str) -> Path | None:
    """`root / relative` resolved, or None when it would escape `root` (absolute paths, `..`, symlinks)."""
    root = root.resolve()
    candidate = (root / relative).resolve()
    return candidate if candidate.is_relative_to(root) else None


class CocoSource:
    """Images and boxes of a COCO annotation file, with category names from its `categories`."""

    def __init__(self, annotation_file: Path, image_root: Path) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_root = Path(image_root)
        self.dataset = _load_json(self.annotation_file)
        self.coco = COCO()
        self.coco.dataset = self.dataset
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            self.coco.createIndex()
        self.categories: dict[int, str] = {c["id"]: c["name"] for c in self.dataset["categories"]}

    def __len__(self) -> int:
        return len(self.dataset["images"])

    @property
    def image_ids(self) -> list[int]:
        return sorted(self.coco.imgs)

    def __iter__(self) -> Iterator[ImageRecord | SourceError]:
        for image_id in self.image_ids:
            yield from self.read(image_id)

    def read(self, image_id: int) -> Iterator[ImageRecord | SourceError]:
        """The record of one image, preceded by an error for each of its bad annotations (or one error)."""
        info = self.coco.imgs[image_id]
        path = safe_join(self.image_root, str(info["file_name"]))
        if path is None:
            yield SourceError(image_id, ErrorReason.PATH_ESCAPES_ROOT,
                              f"file_name {info['file_name']!r} points outside the image root {self.image_root}",
                              path=str(info["file_name"]))
            return
        if not path.is_file():
            yield SourceError(image_id, ErrorReason.MISSING_FILE, f"image file not found: {path}", path=str(path))
            return
        try:
            with Image.open(path) as image:
                width, height = image.size
        except Exception as exc:  # PIL raises several types for corrupt files
            yield SourceError(image_id, ErrorReason.UNREADABLE_IMAGE, f"cannot read image {path}: {exc}", path=str(path))
            return
        boxes, labels, names, ann_ids = [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            checked = self._check_annotation(ann, width, height)
            if isinstance(checked, SourceError):
                yield checked
                continue
            boxes.append(checked)
            labels.append(ann["category_id"])
            names.append(self.categories[ann["category_id"]])
            ann_ids.append(int(ann["id"]))
        yield ImageRecord(
            image_id=int(image_id), path=path, width=width, height=height,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64), names=tuple(names), annotation_ids=tuple(ann_ids),
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
