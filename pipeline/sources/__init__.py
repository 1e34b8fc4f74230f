"""Where images come from: COCO json + image root, a plain image folder, or synthetic planted-cue data.

Every source yields `ImageRecord`s (absolute xyxy GT boxes) and `SourceError`s, never raises on bad content.
Imports nothing from the rest of the project but `pipeline.sources`.
"""

from eive_audit.pipeline.sources.coco import CocoSource
from eive_audit.pipeline.sources.folder import FolderSource
from eive_audit.pipeline.sources.records import ErrorReason, ImageRecord, SourceError, SourceFormatError

__all__ = ["CocoSource", "FolderSource", "ErrorReason", "ImageRecord", "SourceError", "SourceFormatError"]
