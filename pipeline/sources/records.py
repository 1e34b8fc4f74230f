"""The two things a source yields: an image record to audit, or a typed error to store.

A source never raises on bad content: a broken image or annotation becomes a `SourceError`, which the
audit writes to its `errors` table while the stream goes on. Only input that is not a dataset at all
(a json that is not COCO, or whose ids are not int64 integers) raises, at once, with `SourceFormatError`.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class SourceFormatError(ValueError):
    """The input is not a dataset of the expected kind; the message names the file and the problem."""


class ErrorReason(str, enum.Enum):
    """Why a source could not yield (part of) an image. Stored as text in the `errors` table.

    Image-level reasons (the image is not audited; the row has no annotation id): missing_file,
    unreadable_image, path_escapes_root, bad_file_name (null, empty or not a string), size_mismatch (the
    declared width/height are not the file's displayed size, so its boxes cannot be placed), and
    duplicate_image_id (one row per entry sharing the id: no box can be attributed to one of them).
    Annotation-level reasons (the row has the annotation id; its image is audited with its other boxes):
    box_out_of_bounds, degenerate_box (non-positive size), non_finite_box (NaN or infinite coordinate),
    unknown_category, malformed_annotation (a bbox that is not four numbers, a category or image id that is
    not an int64 integer), duplicate_annotation_id (every copy), and orphan_annotation (an image id that no
    entry of `images` has; the row keeps that image id).

    Classification sources (`classify.py`) reuse them. An image's label is what a classification audit scores
    it against, so a bad label is an image-level row (the image is not audited): malformed_annotation for a
    label that is not a non-empty string, unknown_category for one not in the index's `classes` and for an
    image of an ImageFolder tree that lies in no class folder. Its object boxes are annotation-level rows
    whose annotation id is the box's position among the image's boxes (0-based).
    """

    MISSING_FILE = "missing_file"
    UNREADABLE_IMAGE = "unreadable_image"
    PATH_ESCAPES_ROOT = "path_escapes_root"
    BAD_FILE_NAME = "bad_file_name"
    SIZE_MISMATCH = "size_mismatch"
    DUPLICATE_IMAGE_ID = "duplicate_image_id"
    BOX_OUT_OF_BOUNDS = "box_out_of_bounds"
    DEGENERATE_BOX = "degenerate_box"
    NON_FINITE_BOX = "non_finite_box"
    UNKNOWN_CATEGORY = "unknown_category"
    MALFORMED_ANNOTATION = "malformed_annotation"
    DUPLICATE_ANNOTATION_ID = "duplicate_annotation_id"
    ORPHAN_ANNOTATION = "orphan_annotation"


@dataclass(frozen=True)
class SourceError:
    """One problem found while reading a dataset.

    `annotation_id` is set when only one annotation is bad: the image itself is still yielded with its
    valid boxes, so one broken box does not drop an image from the audit.
    """

    image_id: int | None
    reason: ErrorReason
    message: str
    path: str | None = None
    annotation_id: int | None = None


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


def _empty_labels() -> np.ndarray:
    return np.zeros((0,), dtype=np.int64)


def _empty_flags() -> np.ndarray:
    return np.zeros((0,), dtype=bool)


@dataclass(frozen=True)
class ImageRecord:
    """One image to audit.

    Boxes are absolute pixel xyxy, float32 [n, 4]; `labels` are the dataset's category ids [n];
    `names` the matching category names; `crowd` [n] marks COCO crowd regions (`iscrowd`: one box over many
    objects, which evaluation ignores rather than counts), all False when not given. A folder source yields
    records with no boxes. `width` and `height` are the display size (`decode.display_size`: EXIF orientation
    applied), the frame of the boxes and of every stored coordinate; `exif_orientation` is the EXIF tag
    applied (None without one).

    Classification sources set `class_label`, the category id (a key of the source's `categories`) of the
    class the whole image belongs to, and `class_name`, its name; both None for a detection source. Their
    boxes are the optional object boxes of that class, each labelled with it, against which the audit scores
    localisation.
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=_empty_boxes)
    labels: np.ndarray = field(default_factory=_empty_labels)
    names: tuple[str, ...] = ()
    annotation_ids: tuple[int, ...] = ()
    crowd: np.ndarray = field(default_factory=_empty_flags)
    exif_orientation: int | None = None
    class_label: int | None = None
    class_name: str | None = None

    def __post_init__(self) -> None:
        if len(self.crowd) == 0:  # not given: no crowd regions
            object.__setattr__(self, "crowd", np.zeros(len(self.labels), dtype=bool))
        if self.crowd.shape != (len(self.labels),):
            raise ValueError(f"crowd flags {self.crowd.shape} do not match {len(self.labels)} labels")
        if self.boxes.shape != (len(self.labels), 4):
            raise ValueError(f"boxes {self.boxes.shape} do not match {len(self.labels)} labels")
        if len(self.names) != len(self.labels):
            raise ValueError(f"{len(self.names)} names for {len(self.labels)} labels")
        if (self.class_label is None) != (self.class_name is None):
            raise ValueError(f"class label {self.class_label!r} and class name {self.class_name!r}: "
                             "give both or neither")


class ImageStream(abc.ABC):
    """The stream every source is: the errors found on opening that belong to no image (`open_errors`), then
    each image id's record or errors (`read`) in `image_ids` order; its length is the number of image ids."""

    open_errors: tuple[SourceError, ...] = ()

    @property
    @abc.abstractmethod
    def image_ids(self) -> list[int]:
        """Every image id of the source, once, in the order the stream reads them."""

    @abc.abstractmethod
    def read(self, image_id: int) -> Iterator[ImageRecord | SourceError]:
        """The record of one image, or the errors that stop or accompany it."""

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[ImageRecord | SourceError]:
        yield from self.open_errors
        for image_id in self.image_ids:
            yield from self.read(image_id)
