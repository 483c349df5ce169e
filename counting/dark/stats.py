"""Dark references from per-pixel sums of raw frames: sums that add up across batches, nodes and files,
and the reference made from them (float32 mean, per-pixel noise, hot pixels).

The sums are float64: a sum of uint16 values is exact in float64 up to 2**53 / 65535 frames, so sums
made anywhere (a node's share of a streamed dark scan, a file, the simulator) add up to exactly the sum of
all the frames, and the mean ``(total / frames).astype(float32)`` is bit for bit what counting.dark's
``dark_reference`` gives for the same frames.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from counting.dark.settings import HOT_SIGMA
from counting.geometry import FRAME_SHAPE


@dataclass
class DarkSums:
    """Per-pixel sum and sum of squares of raw frames, and how many frames."""

    total: np.ndarray = field(default_factory=lambda: np.zeros(FRAME_SHAPE, np.float64))
    total_sq: np.ndarray = field(default_factory=lambda: np.zeros(FRAME_SHAPE, np.float64))
    frames: int = 0

    def add(self, frames: np.ndarray) -> None:
        """Add raw frames: (n, 576, 576) or one (576, 576), any integer or float dtype."""
        arr = np.asarray(frames)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape[1:] != FRAME_SHAPE:
            raise ValueError(f"dark frames must be 576x576, got {arr.shape[1:]}")
        for frame in arr:  # one frame at a time: no (n, 576, 576) float64 temporary
            f = frame.astype(np.float64)
            self.total += f
            f *= f
            self.total_sq += f
        self.frames += arr.shape[0]

    def merge(self, other: DarkSums) -> DarkSums:
        """Add another's sums to these (returns self)."""
        self.total += other.total
        self.total_sq += other.total_sq
        self.frames += other.frames
        return self

    def save(self, path: Path) -> Path:
        """Write as .npz under a temporary name, then rename (a reader never sees half of it)."""
        tmp = path.with_name(f".{path.name}.partial")
        with open(tmp, "wb") as fh:
            np.savez(fh, total=self.total, total_sq=self.total_sq, frames=np.int64(self.frames))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> DarkSums:
        """Read sums written by ``save``; ValueError naming the file if it is not one."""
        try:
            with np.load(path, allow_pickle=False) as z:
                sums = cls(z["total"].astype(np.float64), z["total_sq"].astype(np.float64), int(z["frames"]))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot read dark sums {path}: {exc}") from None
        if sums.total.shape != FRAME_SHAPE or sums.total_sq.shape != FRAME_SHAPE:
            raise ValueError(f"dark sums {path} are not 576x576")
        return sums


def sums_of(frames: Iterable[np.ndarray]) -> DarkSums:
    """The sums of frames given as batches (n, 576, 576) or single frames."""
    sums = DarkSums()
    for block in frames:
        sums.add(block)
    return sums


@dataclass(frozen=True)
class DarkReference:
    """A dark reference and its statistics."""

    mean: np.ndarray  # float32 (576, 576): what counting subtracts
    noise: np.ndarray  # float32 (576, 576): per-pixel standard deviation over the frames
    hot: np.ndarray  # bool (576, 576)
    frames: int
    hot_sigma: float

    @property
    def stats(self) -> dict:
        """Scalar statistics: mean level, median noise, hot pixels (for records and the catalogue)."""
        return {
            "frames": self.frames,
            "mean": float(self.mean.mean(dtype=np.float64)),
            "noise": float(np.median(self.noise)),
            "hot_pixels": int(self.hot.sum()),
            "hot_sigma": self.hot_sigma,
            "min": float(self.mean.min()),
            "max": float(self.mean.max()),
        }


def dark_from_sums(sums: DarkSums, hot_sigma: float = HOT_SIGMA) -> DarkReference:
    """The reference of these sums: mean, noise (population std per pixel) and hot pixels (a dark level
    hot_sigma robust sigmas, 1.4826 x median absolute deviation, above the median level)."""
    if sums.frames < 1:
        raise ValueError("no dark frames: a dark reference needs at least one frame")
    mean64 = sums.total / sums.frames
    variance = np.maximum(sums.total_sq / sums.frames - mean64 * mean64, 0.0)
    mean = mean64.astype(np.float32)
    median = float(np.median(mean))
    spread = 1.4826 * float(np.median(np.abs(mean - median))) or 1.0
    hot = mean > median + hot_sigma * spread
    return DarkReference(mean, np.sqrt(variance).astype(np.float32), hot, sums.frames, hot_sigma)
