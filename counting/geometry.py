"""Fixed geometry of the NCEM 4D Camera and the batch type every frame source produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_ROWS = 576
FRAME_COLS = 576
FRAME_SHAPE = (FRAME_ROWS, FRAME_COLS)
N_SECTORS = 4
SECTOR_ROWS = FRAME_ROWS // N_SECTORS  # 144: sector m covers rows m*144 .. m*144+143 (format v5)
SECTOR_PIXELS = SECTOR_ROWS * FRAME_COLS
SECTOR_BYTES = SECTOR_PIXELS * 2  # 165,888 bytes of little-endian uint16
FRAME_BYTES = SECTOR_BYTES * N_SECTORS
ALL_SECTORS = (1 << N_SECTORS) - 1  # 0b1111: every sector of a frame arrived


@dataclass(frozen=True)
class ScanShape:
    """Scan size in probe positions: width = positions per row (x), height = rows (y)."""

    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"scan shape must be positive, got width={self.width} height={self.height}")

    @property
    def positions(self) -> int:
        """Number of scan positions (width * height)."""
        return self.width * self.height

    def position(self, x: int, y: int) -> int:
        """Row-major scan position index of (x, y), as stempy numbers it."""
        return y * self.width + x


@dataclass
class FrameBatch:
    """A batch of assembled frames with their identity; the unit passed to the counting kernel.

    frames: (n, 576, 576) uint16, C-contiguous. Missing sectors are zero and their bit is clear in
    sector_masks, so a reader never hides an incomplete frame.
    """

    frames: np.ndarray
    frame_numbers: np.ndarray  # (n,) int64 detector frame counter
    positions: np.ndarray  # (n,) int64 scan position y*width + x
    sector_masks: np.ndarray  # (n,) uint8, bit m set when sector m arrived

    def __post_init__(self) -> None:
        n = self.frames.shape[0]
        if self.frames.ndim != 3 or self.frames.shape[1:] != FRAME_SHAPE or self.frames.dtype != np.uint16:
            raise ValueError(
                f"frames must be (n, 576, 576) uint16, got {self.frames.shape} {self.frames.dtype}"
            )
        for name in ("frame_numbers", "positions", "sector_masks"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} frames")

    def __len__(self) -> int:
        return int(self.frames.shape[0])
