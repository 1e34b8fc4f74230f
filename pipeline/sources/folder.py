"""A folder of images without annotations: every readable image becomes a record with no boxes."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from eive_audit.pipeline.sources.decode import display_size
from eive_audit.pipeline.sources.records import ErrorReason, ImageRecord, ImageStream, SourceError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


class FolderSource(ImageStream):
    """Images under `root` (recursively, sorted by relative path); ids are 1-based positions in that order.

    A file that links outside `root` keeps its position and becomes an error, not a silent gap."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder not found: {self.root}")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        self.categories: dict[int, str] = {}

    @property
    def image_ids(self) -> list[int]:
        return list(range(1, len(self.paths) + 1))

    def read(self, image_id: int) -> Iterator[ImageRecord | SourceError]:
        """The record of one image, or the error that stops it."""
        path = self.paths[image_id - 1]
        if not path.resolve().is_relative_to(self.root.resolve()):  # a symlink out of the folder
            yield SourceError(image_id, ErrorReason.PATH_ESCAPES_ROOT,
                              f"{path} links outside the image folder {self.root}", str(path))
            return
        try:
            width, height, orientation = display_size(path)
        except Exception as exc:  # PIL raises several types for corrupt files
            yield SourceError(image_id, ErrorReason.UNREADABLE_IMAGE, f"cannot read image {path}: {exc}", str(path))
            return
        yield ImageRecord(image_id=image_id, path=path, width=width, height=height, exif_orientation=orientation)
