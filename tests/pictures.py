"""Image files that Pillow cannot write, for the decoding tests: 16-bit colour PNGs."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC of type and data (PNG spec 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 pixels [h, w] (gray), [h, w, 2] (gray + alpha), [h, w, 3] or [h, w, 4]: Pillow
    writes 16-bit gray only, so the chunks are written here (IHDR, one IDAT, IEND)."""
    h, w = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = pixels.astype(">u2").reshape(h, w * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))
