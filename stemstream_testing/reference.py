"""Plain numpy electron counting: the readable definition the compiled kernel is tested against."""

from __future__ import annotations

import numpy as np

from counting.kernel import EventList, Thresholds


def count_reference(
    frames: np.ndarray,
    dark: np.ndarray | None,
    thresholds: Thresholds,
    gain: np.ndarray | None = None,
) -> EventList:
    """Count (n, H, W) frames with vectorised numpy, exactly as the kernel defines an event."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    n, h, w = frames.shape
    v = frames.astype(np.float64)
    if dark is not None:
        v -= np.asarray(dark, np.float32).astype(np.float64)
    if gain is not None:
        v *= (1.0 / np.asarray(gain, np.float64)).astype(np.float32).astype(np.float64)
    keep = (v > thresholds.background) & (v < thresholds.xray)
    v = np.where(keep, v, 0.0)
    # Pad with -inf so neighbours outside the frame never block an event.
    padded = np.full((n, h + 2, w + 2), -np.inf)
    padded[:, 1:-1, 1:-1] = v
    is_max = keep.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                is_max &= v > padded[:, 1 + dy : h + 1 + dy, 1 + dx : w + 1 + dx]
    f, yy, xx = np.nonzero(is_max)
    indices = (yy * w + xx).astype(np.uint32)
    offsets = np.searchsorted(f, np.arange(n + 1)).astype(np.int64)
    return EventList(indices, offsets)


def count_reference_loop(frame: np.ndarray, dark: np.ndarray | None, thresholds: Thresholds) -> np.ndarray:
    """Pixel-by-pixel brute force for one frame (any shape); slow, obviously correct."""
    v = frame.astype(np.float64) - (0.0 if dark is None else np.asarray(dark, np.float32).astype(np.float64))
    h, w = v.shape
    t = np.where((v > thresholds.background) & (v < thresholds.xray), v, 0.0)
    events = []
    for y in range(h):
        for x in range(w):
            if not (thresholds.background < v[y, x] < thresholds.xray):
                continue
            neighbours = [
                t[y + dy, x + dx]
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
                if (dy or dx) and 0 <= y + dy < h and 0 <= x + dx < w
            ]
            if all(t[y, x] > u for u in neighbours):
                events.append(y * w + x)
    return np.array(events, dtype=np.uint32)
