"""Turn a source's stream into decoded image batches; a file that fails to decode becomes an error.

Decoding runs ahead of the forward on a few threads (Pillow releases the GIL while it decodes), at most two
batches ahead so memory stays bounded, and hands items on in the stream's order, errors included, so a
run's rows do not depend on the thread count. For a CUDA model the decoded images are pinned, so their copy
to the device (`models.preprocess`, non-blocking) overlaps the work before it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from eive_audit.pipeline.sources.decode import decode_rgb
from eive_audit.pipeline.sources.records import ErrorReason, ImageRecord, SourceError

Decoded = tuple[ImageRecord, torch.Tensor] | SourceError


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


def iter_batches(stream: Iterable[ImageRecord | SourceError], batch_size: int, max_side: int | None,
                 decode_workers: int = 0, pin: bool = False) -> Iterator[ImageBatch | SourceError]:
    """Group decodable records into batches of `batch_size`, each image decoded to fit `max_side` (the model's
    `PreprocessConfig.longest_edge`: it needs no more) on `decode_workers` threads ahead of the consumer (0:
    in the caller's thread), pinned when `pin`; pass errors (old and new) through where they come."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records: list[ImageRecord] = []
    images: list[torch.Tensor] = []
    for item in decoded(stream, max_side, decode_workers, ahead=2 * batch_size, pin=pin):
        if isinstance(item, SourceError):
            yield item
            continue
        records.append(item[0])
        images.append(item[1])
        if len(records) == batch_size:
            yield ImageBatch(records, images)
            records, images = [], []
    if records:
        yield ImageBatch(records, images)


def decoded(stream: Iterable[ImageRecord | SourceError], max_side: int | None, workers: int, ahead: int,
            pin: bool = False) -> Iterator[Decoded]:
    """Each record of `stream` as (record, image), or the SourceError its file gave, in the stream's order;
    with `workers` threads, up to `ahead` items are in flight (the stream itself is read in this thread)."""
    if workers < 1:
        yield from (_decode(item, max_side, pin) for item in stream)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="eive-decode") as pool:
        pending: deque[Future[Decoded]] = deque()
        for item in stream:
            pending.append(pool.submit(_decode, item, max_side, pin))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _decode(item: ImageRecord | SourceError, max_side: int | None, pin: bool) -> Decoded:
    if isinstance(item, SourceError):
        return item
    try:
        image = decode_rgb(item.path, max_side)
    except Exception as exc:  # Pillow raises several types on corrupt data, and DecompressionBombError
        return SourceError(item.image_id, ErrorReason.UNREADABLE_IMAGE, f"cannot decode {item.path}: {exc}",
                           str(item.path))
    return item, image.pin_memory() if pin else image
