"""Turn a source's stream into decoded image batches; a file that fails to decode becomes an error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from eive_audit.pipeline.models.preprocess import load_image
from eive_audit.pipeline.sources.records import ErrorReason, ImageRecord, SourceError


@dataclass
class ImageBatch:
    """Records and their decoded uint8 [3, h, w] images, in the same order."""

    records: list[ImageRecord]
    images: list[torch.Tensor]


def iter_batches(stream: Iterable[ImageRecord | SourceError], batch_size: int) -> Iterator[ImageBatch | SourceError]:
    """Group decodable records into batches of `batch_size`; pass errors (old and new) through as they come."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records: list[ImageRecord] = []
    images: list[torch.Tensor] = []
    for item in stream:
        if isinstance(item, SourceError):
            yield item
            continue
        try:
            image = load_image(item.path)
        except Exception as exc:  # torchvision raises RuntimeError or OSError on corrupt data
            yield SourceError(item.image_id, ErrorReason.UNREADABLE_IMAGE, f"cannot decode {item.path}: {exc}", str(item.path))
            continue
        records.append(item)
        images.append(image)
        if len(records) == batch_size:
            yield ImageBatch(records, images)
            records, images = [], []
    if records:
        yield ImageBatch(records, images)
