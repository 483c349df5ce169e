"""The dark reference and gain every node counts with: sent by the scan writer with each scan's thresholds."""

from __future__ import annotations

import hashlib

import numpy as np

from counting.geometry import FRAME_SHAPE


def calibration_parts(dark: np.ndarray | None, gain: np.ndarray | None) -> tuple[bytes, bytes]:
    """The dark and gain as float32 bytes (empty when absent), as sent with thresholds."""
    return tuple(b"" if a is None else np.ascontiguousarray(a, np.float32).tobytes() for a in (dark, gain))


def calibration_digest(dark_bytes: bytes, gain_bytes: bytes) -> str:
    """Identifies a dark+gain pair, so a node knows whether it already counts with it."""
    return hashlib.sha256(b"dark" + dark_bytes + b"gain" + gain_bytes).hexdigest()[:32]


def calibration_arrays(dark_bytes: bytes, gain_bytes: bytes) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The dark and gain back from their bytes (None when empty)."""

    def array(raw: bytes) -> np.ndarray | None:
        return np.frombuffer(raw, np.float32).reshape(FRAME_SHAPE).copy() if raw else None

    return array(dark_bytes), array(gain_bytes)
