"""Saliency maps as bytes: float16 little-endian, row-major, so a map costs 2 bytes per grid cell on disk.

The grid shape is stored beside the bytes (`grid_h`, `grid_w` columns), not inside them, so the bytes
stay a plain array any language can read.
"""

from __future__ import annotations

import numpy as np

_DTYPE = np.dtype("<f2")


def encode_map(array: np.ndarray) -> bytes:
    """A 2-D real map -> float16 LE bytes; refuses what would silently become NaN or inf on disk."""
    values = np.asarray(array)
    if values.ndim != 2:
        raise ValueError(f"a map must be 2-D [grid_h, grid_w], got shape {values.shape}")
    if values.size == 0:
        raise ValueError(f"a map must have at least one cell, got shape {values.shape}")
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise TypeError(f"a map must hold real numbers, got dtype {values.dtype}")
    if not np.isfinite(values).all():
        raise ValueError("a map must be finite; it contains NaN or inf")
    with np.errstate(over="ignore"):  # overflow is reported just below, with the range
        half = values.astype(_DTYPE)
    if not np.isfinite(half).all():
        raise ValueError(f"a map value is outside the float16 range (|x| <= {np.finfo(_DTYPE).max}); rescale it first")
    return half.tobytes(order="C")


def decode_map(data: bytes, grid_h: int, grid_w: int) -> np.ndarray:
    """Float16 LE bytes -> a float32 [grid_h, grid_w] array (writable, so callers may normalise in place)."""
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid_h and grid_w must be >= 1, got {grid_h} x {grid_w}")
    expected = grid_h * grid_w * _DTYPE.itemsize
    if len(data) != expected:
        raise ValueError(
            f"map has {len(data)} bytes but a {grid_h} x {grid_w} float16 grid needs {expected}; "
            "grid_h/grid_w do not match the stored map"
        )
    return np.frombuffer(data, dtype=_DTYPE).reshape(grid_h, grid_w).astype(np.float32)
