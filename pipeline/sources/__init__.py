"""Where images come from: COCO json + image root, a plain image folder, a classification index or
ImageFolder tree, or synthetic planted-cue data.

Every source yields `ImageRecord`s (absolute xyxy GT boxes) and `SourceError`s, never raises on bad content.
Imports nothing from the rest of the project but `pipeline.sources`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from eive_audit.pipeline.sources.classify import ImageFolderSource, IndexSource
from eive_audit.pipeline.sources.coco import CocoSource
from eive_audit.pipeline.sources.folder import FolderSource
from eive_audit.pipeline.sources.records import ErrorReason, ImageRecord, SourceError, SourceFormatError

Source = CocoSource | FolderSource | IndexSource | ImageFolderSource

__all__ = ["CocoSource", "FolderSource", "ImageFolderSource", "IndexSource", "ErrorReason", "ImageRecord",
           "SourceError", "SourceFormatError", "Source", "open_source"]


def open_source(images: Path, coco: Path | None = None, index: Path | None = None, task: str = "detect") -> Source:
    """The source of a run, parsed once per process while its annotation file (COCO json or classification
    index) is unchanged: the CLI opens it before the flow starts, so a file that is no dataset stops the run
    with one line, and the flow's tasks share that parse.

    detect: COCO json over `images`, else a plain folder; classify: the index over `images`, else an
    ImageFolder tree. Raises SourceFormatError (a file that is no dataset, a tree without class folders),
    NotADirectoryError (a missing folder), or ValueError for an annotation file of the other task."""
    if task not in ("detect", "classify"):
        raise ValueError(f"task must be detect or classify, not {task!r}")
    if (task == "detect" and index is not None) or (task == "classify" and coco is not None):
        raise ValueError(f"a {task} source reads {'--coco' if task == 'detect' else '--index'}, not the other one")
    annotations = coco if task == "detect" else index
    stat = Path(annotations).stat() if annotations is not None and Path(annotations).is_file() else None
    return _opened(Path(images), None if annotations is None else Path(annotations), task,
                   None if stat is None else (stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=2)
def _opened(images: Path, annotations: Path | None, task: str, stamp: tuple[int, int] | None) -> Source:
    if task == "classify":
        return IndexSource(annotations, images) if annotations is not None else ImageFolderSource(images)
    return CocoSource(annotations, images) if annotations is not None else FolderSource(images)
