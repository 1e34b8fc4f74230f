"""Where images come from: COCO json + image root, a plain image folder, or synthetic planted-cue data.

Every source yields `ImageRecord`s (absolute xyxy GT boxes) and `SourceError`s, never raises on bad content.
Imports nothing from the rest of the project but `pipeline.sources`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from eive_audit.pipeline.sources.coco import CocoSource
from eive_audit.pipeline.sources.folder import FolderSource
from eive_audit.pipeline.sources.records import ErrorReason, ImageRecord, SourceError, SourceFormatError

__all__ = ["CocoSource", "FolderSource", "ErrorReason", "ImageRecord", "SourceError", "SourceFormatError",
           "open_source"]


def open_source(images: Path, coco: Path | None) -> CocoSource | FolderSource:
    """The source of a run, parsed once per process while its annotation file is unchanged: the CLI opens
    it before the flow starts, so a file that is no dataset stops the run with one line, and the flow's
    tasks share that parse. Raises SourceFormatError (COCO) or NotADirectoryError (a folder)."""
    stat = Path(coco).stat() if coco is not None and Path(coco).is_file() else None
    return _opened(Path(images), None if coco is None else Path(coco),
                   None if stat is None else (stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=2)
def _opened(images: Path, coco: Path | None, stamp: tuple[int, int] | None) -> CocoSource | FolderSource:
    return CocoSource(coco, images) if coco is not None else FolderSource(images)
