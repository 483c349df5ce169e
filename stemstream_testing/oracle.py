"""stempy (the production counter) as an oracle for tests and benchmarks; stempy is a test-only dependency."""

from __future__ import annotations

import numpy as np

from counting.geometry import FRAME_SHAPE
from counting.kernel import Thresholds


def stempy_count_frames(
    frames: np.ndarray, dark: np.ndarray | None, thresholds: Thresholds
) -> list[np.ndarray]:
    """Count frames one by one with stempy's electron_count_frame and fixed thresholds."""
    from stempy.image import electron_count_frame

    dark32 = np.zeros(FRAME_SHAPE, np.float32) if dark is None else np.asarray(dark, np.float32)
    return [
        np.asarray(
            electron_count_frame(
                np.ascontiguousarray(f),
                darkreference=dark32,
                background_threshold=thresholds.background,
                xray_threshold=thresholds.xray,
            ).data[0, 0]
        )
        for f in frames
    ]


def stempy_thresholds(
    sample_frames: np.ndarray,
    number_of_samples: int = 1200,
    background_n_sigma: float = 4.5,
    xray_n_sigma: float = 175.0,
) -> Thresholds:
    """stempy's calculate_thresholds over the given frames (one block each), with production's zero dark."""
    from stempy import _image
    from stempy.io import PyReader

    n = len(sample_frames)
    frames = np.ascontiguousarray(sample_frames, dtype=np.uint16)
    reader = PyReader(frames, np.arange(n, dtype=np.uint32), (n, 1), 1, n)
    blocks = [next(reader)._block for _ in range(n)]
    res = _image.calculate_thresholds(
        blocks, np.zeros(FRAME_SHAPE, np.float32), number_of_samples, background_n_sigma, xray_n_sigma
    )
    return Thresholds(res.background_threshold, res.xray_threshold)
