"""Bins of bright-field detector positions for streaming parallax: an n x n grid over the BF disk's
bounding square, each detector pixel inside the disk labelled with its bin (1..bins, 0 = outside the disk).

The bins cover the inner 85 % of the disk's radius (inner): where the sample deflects the disk (the DPC
signal), its edge moves across the detector, and a bin the edge crosses would see that motion, not the
parallax; inside the edge a deflected disk lights every bin alike.

Only bins holding disk pixels are kept (8 x 8 over a disk keeps 60: the four corners miss it). A bin's
position k is the centroid of its disk pixels, in detector px from the disk centre, (x, y) = (column, row):
edge bins are cut by the circle, so their centroid, not the square's centre, is the tilt they see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from counting.geometry import FRAME_COLS, FRAME_ROWS
from counting.live_images import LiveGeometry

DEFAULT_BINS = 8  # bins per side across the BF disk (the live setting's default)
DEFAULT_INNER = 0.85  # fraction of the BF radius the bins cover
MAX_BINS = 32  # per side; 32 x 32 keeps ~800 bins, already 1.6 kB per scan position in uint16


@dataclass(frozen=True)
class ParallaxBins:
    """The bins of one geometry: labels per detector pixel and each kept bin's k."""

    geometry: LiveGeometry
    n: int  # bins per side of the grid
    inner: float  # fraction of the BF radius covered
    labels: np.ndarray  # uint16 (576*576,): 0 outside the BF disk, else bin number 1..count
    k: np.ndarray  # float64 (count, 2): (x, y) centroid of each bin's pixels from the disk centre, det px
    pixels: np.ndarray  # int64 (count,): detector pixels in each bin

    @classmethod
    def from_geometry(
        cls, geometry: LiveGeometry, n: int = DEFAULT_BINS, inner: float = DEFAULT_INNER
    ) -> ParallaxBins:
        """The n x n grid of bins over the inner part (inner x the radius) of this geometry's BF disk."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= MAX_BINS:
            raise ValueError(f"bins per side must be an integer in 1..{MAX_BINS}, got {n!r}")
        if not (isinstance(inner, int | float) and 0.1 <= inner <= 1.0):
            raise ValueError(f"inner must be a fraction in [0.1, 1], got {inner!r}")
        r = geometry.bf_radius * inner
        row, col = np.mgrid[0:FRAME_ROWS, 0:FRAME_COLS]
        dx, dy = col - geometry.cx, row - geometry.cy
        inside = (dx**2 + dy**2 <= r**2).ravel()  # inner = 1: the same disk as LiveGeometry.labels' BF
        width = 2.0 * r / n
        bx = np.clip(np.floor((dx + r) / width), 0, n - 1).astype(np.int64).ravel()
        by = np.clip(np.floor((dy + r) / width), 0, n - 1).astype(np.int64).ravel()
        grid = np.where(inside, by * n + bx + 1, 0)  # 1..n*n, 0 outside
        counts = np.bincount(grid, minlength=n * n + 1)
        kept = np.flatnonzero(counts[1:]) + 1
        renumber = np.zeros(n * n + 1, np.int64)
        renumber[kept] = np.arange(1, len(kept) + 1)
        labels = renumber[grid].astype(np.uint16)
        pixels = np.bincount(labels, minlength=len(kept) + 1)[1:]
        sx = np.bincount(labels, weights=dx.ravel(), minlength=len(kept) + 1)[1:]
        sy = np.bincount(labels, weights=dy.ravel(), minlength=len(kept) + 1)[1:]
        k = np.stack([sx / pixels, sy / pixels], axis=1)
        return cls(geometry, int(n), float(inner), labels, k, pixels.astype(np.int64))

    @property
    def count(self) -> int:
        """Number of kept bins."""
        return int(len(self.k))
