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


def load_frame_array(path: str, what: str = "dark reference") -> np.ndarray:
    """Load a 576x576 .npy calibration array (dark or gain) as float32, with a clear error if unusable."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise ValueError(f"cannot read {what} {path}: it is an .npz archive, expected one .npy array")
    if arr.shape != FRAME_SHAPE:
        raise ValueError(f"{what} {path} has shape {arr.shape}, expected {FRAME_SHAPE}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} {path} contains NaN or infinite values")
    return arr


def load_dark(path: str) -> np.ndarray:
    """Load a dark reference .npy file and check it is a finite 576x576 array."""
    return load_frame_array(path, "dark reference")
