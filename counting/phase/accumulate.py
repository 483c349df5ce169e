"""Streaming parallax sums: per scan position, the electrons counted in each bright-field bin
(counting.phase.bins), from the same counted batches counting.live_images takes (per-frame positions and
sector masks, events in CSR: offsets, indices = row * 576 + col), in one compiled pass per batch.

Memory: counts are (positions, bins) uint16, widened (copied to uint32, then uint64) before a batch could
make any cell overflow, so no count is ever lost or clipped; frames per position are int32. At 512 x 512
with the default 8 x 8 bins (60 kept): 262,144 * 60 * 2 B = 31,457,280 B (30 MiB) of counts plus 1 MiB of
frames; 60 MiB of counts once widened to uint32 (when a cell plus the batch's events at one position
could pass 65,535: after some 300 frames of 200 e at one position, never in a single-frame scan).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numba as nb
import numpy as np

from counting.geometry import FRAME_COLS, FRAME_ROWS
from counting.phase.bins import ParallaxBins

_LADDER = (np.uint16, np.uint32, np.uint64)  # widened in this order


@nb.njit(nogil=True, cache=True)
def _accumulate(positions, offsets, indices, labels, counts, frames):
    """Add each event to its position's bin; returns the largest cell value touched."""
    peak = 0
    for i in range(len(offsets) - 1):
        p = positions[i]
        frames[p] += 1
        for j in range(offsets[i], offsets[i + 1]):
            lab = labels[indices[j]]
            if lab:
                v = counts[p, lab - 1] + 1
                counts[p, lab - 1] = v
                if v > peak:
                    peak = v
    return peak


@dataclass(frozen=True)
class ParallaxSnapshot:
    """A consistent copy of a scan's parallax sums: counts (height*width, bins), frames (height*width,)."""

    height: int
    width: int
    bins: ParallaxBins
    counts: np.ndarray  # uint16/uint32/uint64 (positions, bins), row-major positions
    frames: np.ndarray  # int32 (positions,) frames added per position

    def seen(self) -> np.ndarray:
        """bool (height, width): positions with at least one frame."""
        return (self.frames > 0).reshape(self.height, self.width)

    def bin_images(self) -> np.ndarray:
        """float32 (bins, height, width): electrons per frame in each bin (0 where nothing arrived); 63 MB
        at 512 x 512 with 60 bins."""
        rate = self.counts.T.astype(np.float32)
        rate /= np.maximum(self.frames, 1).astype(np.float32)
        return rate.reshape(-1, self.height, self.width)

    def __add__(self, other: ParallaxSnapshot) -> ParallaxSnapshot:
        """Sums of two snapshots of one scan (e.g. from two nodes), widened as needed."""
        if (self.height, self.width, self.bins.n, self.bins.inner, self.bins.geometry) != (
            other.height,
            other.width,
            other.bins.n,
            other.bins.inner,
            other.bins.geometry,
        ):
            raise ValueError("snapshots of different scans or bins cannot be added")
        counts = self.counts.astype(np.uint64) + other.counts
        return ParallaxSnapshot(
            self.height, self.width, self.bins, _narrowest(counts), self.frames + other.frames
        )


class ParallaxAccumulator:
    """Adds one scan's counted batches into per-position, per-bin counts; batches that come before the
    bins are known (the geometry is settled later, as in live_images) are kept and added at settle()."""

    def __init__(self, scan_h: int, scan_w: int, bins: ParallaxBins | None = None) -> None:
        if not (isinstance(scan_h, int) and isinstance(scan_w, int) and scan_h > 0 and scan_w > 0):
            raise ValueError(f"scan shape must be positive integers, got {scan_h}x{scan_w}")
        self.height, self.width = scan_h, scan_w
        self.bins: ParallaxBins | None = None
        self.counts = np.zeros((0, 0), np.uint16)
        self.frames = np.zeros(scan_h * scan_w, np.int32)
        self.events = 0  # events added (inside the disk or not)
        self._peak = 0  # the largest count of any cell
        self._early: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._lock = threading.Lock()
        if bins is not None:
            self.settle(bins)

    @property
    def nbytes(self) -> int:
        """Bytes held by the sums (counts and frames)."""
        return int(self.counts.nbytes + self.frames.nbytes)

    def add(self, positions: np.ndarray, masks: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> None:
        """Add a counted batch (live_images' format); masks are accepted for the same call, not used."""
        positions, offsets, indices = self._checked(positions, offsets, indices)
        with self._lock:
            self.events += len(indices)
            if self.bins is None:
                self.frames[:] += np.bincount(positions, minlength=len(self.frames)).astype(np.int32)
                self._early.append((positions, offsets, indices))
                return
            self._add(positions, offsets, indices, count_frames=True)

    def settle(self, bins: ParallaxBins) -> ParallaxBins:
        """Fix the bins (once) and add the batches kept until now."""
        with self._lock:
            if self.bins is None:
                self.bins = bins
                self.counts = np.zeros((self.height * self.width, bins.count), np.uint16)
                for pos, off, idx in self._early:
                    self._add(pos, off, idx, count_frames=False)
                self._early.clear()
            return self.bins

    def snapshot(self) -> ParallaxSnapshot:
        """A consistent copy of the sums so far (raises if the bins are not settled yet)."""
        with self._lock:
            if self.bins is None:
                raise ValueError("no parallax bins yet: settle() first")
            return ParallaxSnapshot(
                self.height, self.width, self.bins, self.counts.copy(), self.frames.copy()
            )

    def _add(self, positions, offsets, indices, count_frames: bool) -> None:
        limit = int(np.iinfo(self.counts.dtype).max)
        if self._peak + _most_at_one_position(positions, offsets) > limit:  # could overflow a cell: widen
            self.counts = self.counts.astype(_LADDER[_LADDER.index(self.counts.dtype.type) + 1])
        # Kept batches had their frames counted when they arrived.
        frames = self.frames if count_frames else np.zeros(len(self.frames), np.int32)
        peak = _accumulate(positions, offsets, indices, self.bins.labels, self.counts, frames)
        self._peak = max(self._peak, int(peak))

    def _checked(self, positions, offsets, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Contiguous typed arrays, refused before the compiled pass if any index is out of range."""
        positions = np.ascontiguousarray(positions, np.int64)
        offsets = np.ascontiguousarray(offsets, np.int64)
        indices = np.ascontiguousarray(indices, np.uint32)
        if len(offsets) != len(positions) + 1:
            raise ValueError("offsets must have one entry more than positions")
        if offsets[0] != 0 or offsets[-1] != len(indices) or (len(positions) and np.diff(offsets).min() < 0):
            raise ValueError("offsets must rise from 0 to the number of events")
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self.frames)):
            raise ValueError(f"scan position out of range for a {self.width}x{self.height} scan")
        if len(indices) and indices.max() >= FRAME_ROWS * FRAME_COLS:
            raise ValueError("event pixel index beyond the 576x576 frame")
        return positions, offsets, indices


def _most_at_one_position(positions: np.ndarray, offsets: np.ndarray) -> int:
    """The most events the batch holds for any one position (its frames there together): a bound on what
    it adds to any cell."""
    if not len(positions):
        return 0
    _, which = np.unique(positions, return_inverse=True)
    return int(np.bincount(which, weights=np.diff(offsets)).max())


def _narrowest(counts: np.ndarray) -> np.ndarray:
    """The counts in the narrowest dtype of the ladder that holds their largest value."""
    peak = int(counts.max()) if counts.size else 0
    for dtype in _LADDER:
        if peak <= np.iinfo(dtype).max:
            return counts.astype(dtype)
    return counts


def warm_up() -> None:
    """Compile (or load from numba's cache) the accumulation, before the first scan needs it."""
    from counting.live_images import LiveGeometry

    labels = ParallaxBins.from_geometry(LiveGeometry(288, 288, 10, 12, 20), 2).labels
    event = (np.zeros(1, np.int64), np.array([0, 1], np.int64), np.array([288 * 576 + 288], np.uint32))
    for dtype in _LADDER:  # a widened scan must not wait for a compile mid-scan
        _accumulate(*event, labels, np.zeros((1, 4), dtype), np.zeros(1, np.int32))
