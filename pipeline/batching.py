"""Turn a source's stream into decoded image batches; a file that fails to decode becomes an error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from eive_audit.pipeline.sources.decode import decode_rgb
from eive_audit.pipeline.sources.records import ErrorReason, ImageRecord, SourceError


@dataclass
class ImageBatch:
    """Records and their decoded uint8 [3, h, w] images, in the same order; an image may be a smaller copy
    of its record's (display) size, which `sizes` gives."""

    records: list[ImageRecord]
    images: list[torch.Tensor]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Each record's original (height, width): what boxes are measured in (`preprocess`'s `sizes`)."""
        return [(record.height, record.width) for record in self.records]


def iter_batches(stream: Iterable[ImageRecord | SourceError], batch_size: int,
                 max_side: int | None) -> Iterator[ImageBatch | SourceError]:
    """Group decodable records into batches of `batch_size`, each image decoded to fit `max_side` (the model's
    `PreprocessConfig.longest_edge`: it needs no more); pass errors (old and new) through as they come."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records: list[ImageRecord] = []
    images: list[torch.Tensor] = []
    for item in stream:
        if isinstance(item, SourceError):
            yield item
            continue
        try:
            image = decode_rgb(item.path, max_side)
        except Exception as exc:  # Pillow raises several types on corrupt data, and DecompressionBombError
            yield SourceError(item.image_id, ErrorReason.UNREADABLE_IMAGE, f"cannot decode {item.path}: {exc}", str(item.path))
            continue
        records.append(item)
        images.append(image)
        if len(records) == batch_size:
            yield ImageBatch(records, images)
            records, images = [], []
    if records:
        yield ImageBatch(records, images)
