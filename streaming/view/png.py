"""Live images as small 8-bit greyscale PNGs (zlib only): linear from the 0.5th to the 99.5th percentile,
signed images (centre of mass) centred on mid-grey, the diffraction pattern on a log scale."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def scale(image: np.ndarray, kind: str) -> np.ndarray:
    """uint8 image for display; NaN (positions not reached yet) black."""
    a = np.asarray(image, np.float64)
    seen = np.isfinite(a)
    if not seen.any():
        return np.zeros(a.shape, np.uint8)
    if kind == "pattern":
        a = np.log1p(a)
    if kind in ("com_x", "com_y"):
        m = float(np.nanpercentile(np.abs(a), 99.5))
        out = 127.5 + 127.5 * a / m if m > 0 else np.full(a.shape, 127.5)
    else:
        lo, hi = np.nanpercentile(a, (0.5, 99.5))
        out = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.full(a.shape, 128.0)
    return np.where(seen, np.clip(np.round(np.nan_to_num(out)), 0, 255), 0).astype(np.uint8)


def png(gray: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of a 2-D uint8 array."""
    h, w = gray.shape
    rows = np.hstack([np.zeros((h, 1), np.uint8), np.ascontiguousarray(gray, np.uint8)])  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def image_png(image: np.ndarray, kind: str) -> bytes:
    """A live image (float, any 2-D shape) as PNG."""
    return png(scale(image, kind))
