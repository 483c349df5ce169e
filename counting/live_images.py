"""Live images of a scan from its counted events, batch by batch: virtual bright-field (BF) and annular
dark-field (ADF) images, centre-of-mass sums, the summed diffraction pattern and the frames received per
position. Cheap sums over the sparse events (one compiled pass per batch), never a second look at raw frames.

Geometry: pixel (row, col) is in the BF disk when (row - cy)^2 + (col - cx)^2 <= r^2, and in the ADF annulus
when inner^2 < d^2 <= outer^2. It is given, or estimated from the summed pattern of the first counted frames
of the scan (batches counted before it is known are kept and added once it is).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numba as nb
import numpy as np

from counting.geometry import FRAME_COLS, FRAME_ROWS

BF, ADF = 1, 2  # pixel labels
MAX_POSITIONS = 4096 * 4096  # default cap on a scan's positions (its shape comes from the wire)


@dataclass(frozen=True)
class LiveGeometry:
    """BF disk centre (cx, cy) and radius, ADF annulus radii; pixels of the 576x576 frame."""

    cx: float
    cy: float
    bf_radius: float
    adf_inner: float
    adf_outer: float

    def __post_init__(self) -> None:
        values = (self.cx, self.cy, self.bf_radius, self.adf_inner, self.adf_outer)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):  # from the wire, too
            raise ValueError(f"geometry values must be finite numbers, got {self}")
        if not (self.bf_radius > 0 and self.bf_radius <= self.adf_inner < self.adf_outer):
            raise ValueError(f"need 0 < bf_radius <= adf_inner < adf_outer, got {self}")

    def labels(self) -> np.ndarray:
        """uint8 (576*576,): BF inside the disk, ADF inside the annulus, 0 elsewhere."""
        row, col = np.mgrid[0:FRAME_ROWS, 0:FRAME_COLS]
        d2 = (row - self.cy) ** 2 + (col - self.cx) ** 2
        out = np.zeros(FRAME_ROWS * FRAME_COLS, np.uint8)
        out[(d2 <= self.bf_radius**2).ravel()] = BF
        out[((d2 > self.adf_inner**2) & (d2 <= self.adf_outer**2)).ravel()] = ADF
        return out

    def as_dict(self) -> dict:
        """Plain floats, for headers and JSON."""
        return {k: float(v) for k, v in asdict(self).items()}


def estimate_geometry(pattern: np.ndarray, adf_inner: float = 1.2, adf_outer: float = 2.5) -> LiveGeometry:
    """The BF disk of a summed diffraction pattern (576*576 counts): centre = the counts' centroid, radius =
    where the radial density falls below half of the disk's; centre and radius on a grid of radius/32
    pixels, so nodes that see similar frames agree. The annulus is adf_inner..adf_outer times the radius."""
    img = np.asarray(pattern, np.float64).reshape(FRAME_ROWS, FRAME_COLS)
    total = img.sum()
    if total <= 0:
        cx = cy = FRAME_COLS / 2
        r = FRAME_COLS / 8
    else:
        cy = float(round((img.sum(axis=1) @ np.arange(FRAME_ROWS)) / total))
        cx = float(round((img.sum(axis=0) @ np.arange(FRAME_COLS)) / total))
        row, col = np.mgrid[0:FRAME_ROWS, 0:FRAME_COLS]
        ring = np.hypot(row - cy, col - cx).astype(np.int64).ravel() // 2  # 2-pixel rings
        counts = np.bincount(ring, weights=img.ravel())
        area = np.bincount(ring).astype(np.float64)
        density = np.convolve(counts, np.ones(3), "same") / np.maximum(
            np.convolve(area, np.ones(3), "same"), 1
        )
        half = int(np.searchsorted(np.cumsum(counts), total / 2))  # inside the disk unless most scatter
        plateau = float(np.median(density[: half + 1]))
        beyond = np.flatnonzero(density[half:] < plateau / 2)
        r = 2.0 * (half + (beyond[0] if len(beyond) else len(density) - half))
    # Snapped to a grid of r/32 pixels: nodes estimating from their own first frames (the disk moves a
    # little over the scan) then almost always agree, and the images they add up use one geometry.
    step = max(round(r / 32), 1)
    cx, cy, r = (float(max(round(v / step) * step, step)) for v in (cx, cy, r))
    return LiveGeometry(cx, cy, r, max(float(round(adf_inner * r)), r), float(round(adf_outer * r)) + 1)


@nb.njit(nogil=True, cache=True)
def _accumulate(positions, offsets, indices, labels, full, counts, bf, adf, sum_col, sum_row, pattern):
    for i in range(len(offsets) - 1):
        p = positions[i]
        for j in range(offsets[i], offsets[i + 1]):
            pix = indices[j]
            lab = labels[pix]
            if lab == 1:
                bf[p] += 1
            elif lab == 2:
                adf[p] += 1
            if full:
                counts[p] += 1
                sum_col[p] += pix % 576
                sum_row[p] += pix // 576
                pattern[pix] += 1


@dataclass
class LiveArrays:
    """One scan's sums so far (per position arrays of length width*height, row-major)."""

    counts: np.ndarray  # int64 events per position
    bf: np.ndarray  # int64 events in the BF disk
    adf: np.ndarray  # int64 events in the ADF annulus
    sum_col: np.ndarray  # int64 sum of event columns (CoM x = sum_col / counts - cx)
    sum_row: np.ndarray  # int64 sum of event rows
    frames: np.ndarray  # int32 frames received per position
    pattern: np.ndarray  # int64 (576*576,) summed diffraction pattern

    @classmethod
    def zeros(cls, positions: int) -> LiveArrays:
        """Empty sums for a scan of this many positions."""
        z = [np.zeros(positions, np.int64) for _ in range(5)]
        return cls(*z, np.zeros(positions, np.int32), np.zeros(FRAME_ROWS * FRAME_COLS, np.int64))

    def com(self, geometry: LiveGeometry) -> tuple[np.ndarray, np.ndarray]:
        """Centre-of-mass shift (x, y) per position, pixels from the BF centre; 0 where nothing counted."""
        n = np.maximum(self.counts, 1)
        seen = self.counts > 0
        return (
            np.where(seen, self.sum_col / n - geometry.cx, 0.0),
            np.where(seen, self.sum_row / n - geometry.cy, 0.0),
        )


class LiveImages:
    """Accumulates one scan's live images from counted batches (in any order)."""

    def __init__(
        self,
        width: int,
        height: int,
        geometry: LiveGeometry | None = None,
        estimate_frames: int = 64,
        adf_factors: tuple[float, float] = (1.2, 2.5),
        auto_settle: bool = True,
        max_positions: int = MAX_POSITIONS,
    ) -> None:
        if not (width > 0 and height > 0 and width * height <= max_positions):  # before allocating for it
            raise ValueError(f"a {width}x{height} scan is outside 1..{max_positions} positions")
        self.width, self.height = width, height
        self.arrays = LiveArrays.zeros(width * height)
        self.geometry = geometry
        self.estimate_frames = estimate_frames
        self.adf_factors = adf_factors
        self.auto_settle = auto_settle  # False: the caller settles (e.g. on a geometry agreed elsewhere)
        self.frames = 0  # frames added
        self.sectors = 0  # sectors those frames hold (from their masks)
        self.events = 0
        self._labels = (
            geometry.labels() if geometry is not None else np.zeros(FRAME_ROWS * FRAME_COLS, np.uint8)
        )
        self._early: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # batches before the geometry

    def add(self, positions: np.ndarray, masks: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> None:
        """Add a counted batch: per-frame positions and sector masks, events in CSR (offsets, indices)."""
        positions = np.ascontiguousarray(positions, np.int64)
        offsets = np.ascontiguousarray(offsets, np.int64)
        indices = np.ascontiguousarray(indices, np.uint32)
        if len(offsets) != len(positions) + 1:
            raise ValueError("offsets must have one entry more than positions")
        if len(positions) and (positions.min() < 0 or positions.max() >= self.width * self.height):
            raise ValueError(f"scan position out of range for a {self.width}x{self.height} scan")
        a = self.arrays
        _accumulate(
            positions,
            offsets,
            indices,
            self._labels,
            True,
            a.counts,
            a.bf,
            a.adf,
            a.sum_col,
            a.sum_row,
            a.pattern,
        )
        np.add.at(a.frames, positions, 1)
        self.frames += len(positions)
        self.sectors += int(np.unpackbits(np.asarray(masks, np.uint8)[:, None], axis=1).sum())
        self.events += len(indices)
        if self.geometry is None:
            self._early.append((positions, offsets, indices))
            if self.auto_settle and self.ready_to_estimate:
                self.settle()

    @property
    def ready_to_estimate(self) -> bool:
        """Enough frames for the geometry estimate."""
        return self.frames >= self.estimate_frames

    def estimate(self) -> LiveGeometry:
        """The geometry estimated from what was added so far (nothing is fixed)."""
        return estimate_geometry(self.arrays.pattern, *self.adf_factors)

    def settle(self, geometry: LiveGeometry | None = None) -> LiveGeometry:
        """Fix the geometry now (the given one, else estimated from what was added) and add the kept
        batches; once fixed it stays."""
        if self.geometry is None:
            self.geometry = geometry or self.estimate()
            self._labels = self.geometry.labels()
            a = self.arrays
            for pos, off, idx in self._early:
                _accumulate(
                    pos, off, idx, self._labels, False, a.counts, a.bf, a.adf, a.sum_col, a.sum_row, a.pattern
                )
            self._early.clear()
        return self.geometry


def warm_up() -> None:
    """Compile (or load from numba's cache) the accumulation, before the first scan needs it."""
    LiveImages(1, 1, LiveGeometry(288, 288, 10, 12, 20)).add(
        np.zeros(1, np.int64), np.ones(1, np.uint8), np.array([0, 1]), np.zeros(1, np.uint32)
    )
