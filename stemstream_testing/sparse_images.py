"""Virtual BF and ADF images straight from the sparse events: an independent cross-check of the virtual
detectors that tasks.analysis.analyse computes with py4DSTEM on the binned, dense data cube."""

from __future__ import annotations

import numpy as np

from counting.geometry import FRAME_COLS
from counting.sparse import CountedScan


def virtual_images(
    counted: CountedScan, inner: float, outer: float, center: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(BF, ADF) event counts per position straight from the sparse events, each (height, width).

    BF counts events closer than ``inner`` detector pixels to ``center`` (row, col); ADF those with
    ``inner <= r < outer``. ``center`` defaults to the centroid of all events."""
    flat = list(counted.events.ravel())
    sizes = np.fromiter((len(e) for e in flat), np.int64, len(flat))
    positions = counted.scan.positions
    if not sizes.sum():
        empty = np.zeros((counted.scan.height, counted.scan.width))
        return empty, empty.copy()
    idx = np.concatenate(flat).astype(np.int64)
    pos = np.repeat(np.arange(len(flat)) // counted.frames_per_position, sizes)
    row, col = np.divmod(idx, FRAME_COLS)
    cy, cx = center if center is not None else (row.mean(), col.mean())
    r2 = (row - cy) ** 2 + (col - cx) ** 2
    in_bf = r2 < inner**2
    in_adf = ~in_bf & (r2 < outer**2)
    shape = (counted.scan.height, counted.scan.width)
    bf = np.bincount(pos[in_bf], minlength=positions).astype(np.float64).reshape(shape)
    adf = np.bincount(pos[in_adf], minlength=positions).astype(np.float64).reshape(shape)
    return bf, adf
