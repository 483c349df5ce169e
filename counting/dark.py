"""Dark reference: the per-pixel mean of frames taken with the beam blanked."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from counting.geometry import FRAME_SHAPE


def dark_reference(frames: Iterable[np.ndarray]) -> np.ndarray:
    """Mean of dark frames (any batches of (n,576,576) or single frames) as float32; never wraps."""
    total = np.zeros(FRAME_SHAPE, np.float64)
    count = 0
    for block in frames:
        arr = np.asarray(block)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape[1:] != FRAME_SHAPE:
            raise ValueError(f"dark frames must be 576x576, got {arr.shape[1:]}")
        total += arr.sum(axis=0, dtype=np.float64)
        count += arr.shape[0]
    if count == 0:
        raise ValueError("no dark frames given")
    return (total / count).astype(np.float32)


def load_dark(path: str) -> np.ndarray:
    """Load a dark reference .npy file and check it is a finite 576x576 array."""
    try:
        dark = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read dark reference {path}: {exc}") from exc
    if dark.shape != FRAME_SHAPE:
        raise ValueError(f"dark reference {path} has shape {dark.shape}, expected {FRAME_SHAPE}")
    dark = dark.astype(np.float32)
    if not np.isfinite(dark).all():
        raise ValueError(f"dark reference {path} contains NaN or infinite values")
    return dark
