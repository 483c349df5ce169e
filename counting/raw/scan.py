"""Reading: ``RawScan``, an indexed set of raw sector files of one scan, yielding assembled frames."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np

from counting.geometry import ALL_SECTORS, FRAME_SHAPE, N_SECTORS, FrameBatch, ScanShape
from counting.raw.block_io import read_blocks
from counting.raw.index import index_scan
from counting.raw.layout import DEFAULT_VERSION, PathLike, check_version, sector_shape, sector_slice


class RawScan:
    """An indexed set of raw sector files of one scan; yields assembled frames in frame-number order."""

    def __init__(self, paths: Sequence[PathLike] | PathLike, version: int | None = None) -> None:
        self._version = DEFAULT_VERSION if version is None else version
        check_version(self._version)
        path_list = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
        self._paths = tuple(Path(p) for p in path_list)
        index = index_scan(self._paths)
        self._scan_number, self._scan_shape = index.scan_number, index.scan_shape
        self._frame_numbers, self._positions, self._masks = index.frame_numbers, index.positions, index.masks
        self._sector_file, self._sector_offset = index.sector_file, index.sector_offset
        self._sector_count, self._per_position = index.sector_count, index.per_position

    # ---- identity and completeness ------------------------------------------------------------

    @property
    def paths(self) -> tuple[Path, ...]:
        """The files of the scan, in the order given."""
        return self._paths

    @property
    def version(self) -> int:
        """The raw format version the files are read as (4 or 5)."""
        return self._version

    @property
    def scan_number(self) -> int:
        """The scan number shared by every block."""
        return self._scan_number

    @property
    def scan_shape(self) -> ScanShape:
        """The scan size shared by every block header."""
        return self._scan_shape

    @property
    def num_frames(self) -> int:
        """Number of distinct frame numbers found (complete or not)."""
        return int(self._frame_numbers.size)

    @property
    def frame_numbers(self) -> np.ndarray:
        """All frame numbers, ascending (a copy)."""
        return self._frame_numbers.copy()

    @property
    def positions(self) -> np.ndarray:
        """Scan position of each frame, aligned with frame_numbers (a copy)."""
        return self._positions.copy()

    @property
    def sector_masks(self) -> np.ndarray:
        """Arrived-sector bit mask of each frame, aligned with frame_numbers (a copy)."""
        return self._masks.copy()

    @property
    def frames_per_position(self) -> int:
        """Largest number of frames found at any one scan position."""
        return int(self._per_position.max(initial=0))

    @property
    def incomplete_frames(self) -> np.ndarray:
        """Frame numbers missing at least one sector (their missing sectors read as zeros)."""
        return self._frame_numbers[self._masks != ALL_SECTORS]

    @property
    def missing_positions(self) -> np.ndarray:
        """Scan positions with no frame at all."""
        return np.flatnonzero(self._per_position == 0)

    @property
    def sector_count(self) -> int:
        """Number of sector blocks found in all files."""
        return self._sector_count

    @property
    def expected_sector_count(self) -> int:
        """Sector blocks a loss-free scan would have: positions x frames_per_position x 4."""
        return self._scan_shape.positions * max(self.frames_per_position, 1) * N_SECTORS

    def _incomplete_count(self) -> int:
        return int(np.count_nonzero(self._masks != ALL_SECTORS))

    def summary(self) -> dict[str, int]:
        """Counts for a CLI or log line: frames, complete, incomplete, positions missing, files, sectors."""
        incomplete = self._incomplete_count()
        return {
            "scan_number": self._scan_number,
            "scan_width": self._scan_shape.width,
            "scan_height": self._scan_shape.height,
            "frames": self.num_frames,
            "complete": self.num_frames - incomplete,
            "incomplete": incomplete,
            "frames_per_position": self.frames_per_position,
            "positions_missing": int(self.missing_positions.size),
            "sectors": self._sector_count,
            "expected_sectors": self.expected_sector_count,
            "files": len(self._paths),
        }

    def __repr__(self) -> str:
        shape = self._scan_shape
        return (
            f"RawScan(scan_number={self._scan_number}, shape={shape.width}x{shape.height}, "
            f"frames={self.num_frames}, incomplete={self._incomplete_count()}, files={len(self._paths)}, "
            f"v{self._version})"
        )

    # ---- frame data -------------------------------------------------------------------------------

    def iter_batches(self, batch_size: int = 64, *, reuse_buffer: bool = False) -> Iterator[FrameBatch]:
        """Yield frames in ascending frame_number, `batch_size` at a time; missing sectors are zero.

        With reuse_buffer=True every batch's frames share one array, overwritten by the next batch:
        faster, but the caller must be done with a batch before asking for the next.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        buffer = (
            np.empty((min(batch_size, self.num_frames), *FRAME_SHAPE), dtype=np.uint16)
            if reuse_buffer
            else None
        )
        with ExitStack() as stack:
            handles = [stack.enter_context(open(p, "rb", buffering=0)) for p in self._paths]
            for start in range(0, self.num_frames, batch_size):
                rows = slice(start, min(start + batch_size, self.num_frames))
                count = rows.stop - rows.start
                frames = buffer[:count] if buffer is not None else np.empty((count, *FRAME_SHAPE), np.uint16)
                self._assemble(handles, rows, frames)
                yield FrameBatch(
                    frames=frames,
                    frame_numbers=self._frame_numbers[rows].copy(),
                    positions=self._positions[rows].copy(),
                    sector_masks=self._masks[rows].copy(),
                )

    def _assemble(self, handles: list[BinaryIO], rows: slice, frames: np.ndarray) -> None:
        """Fill `frames` with the sectors of frames `rows`, zeroing the sectors that never arrived."""
        for module in range(N_SECTORS):
            strip = sector_slice(self._version, module)
            file_of = self._sector_file[rows, module]
            offset_of = self._sector_offset[rows, module]
            frames[(np.flatnonzero(file_of < 0), *strip)] = 0
            for file_index in np.unique(file_of[file_of >= 0]):
                local = np.flatnonzero(file_of == file_index)
                self._read_sectors(handles[file_index], offset_of[local], frames, local, strip)

    def _read_sectors(
        self,
        handle: BinaryIO,
        offsets: np.ndarray,
        frames: np.ndarray,
        local: np.ndarray,
        strip: tuple[slice, slice],
    ) -> None:
        """Read the sectors at `offsets` of one file into frames[local][strip]."""
        if self._version == 5:
            # A v5 sector is a contiguous row strip of the frame: read straight into place.
            targets = [frames[(i, *strip)] for i in local]
            read_blocks(handle, offsets, targets)
            return
        # A v4 sector is a column strip (strided in the frame): read contiguously, then scatter.
        scratch = np.empty((local.size, *sector_shape(4)), dtype=np.uint16)
        read_blocks(handle, offsets, list(scratch))
        frames[(local, *strip)] = scratch


def open_raw_scan(paths: Sequence[PathLike] | PathLike, version: int | None = None) -> RawScan:
    """Index raw sector files (header-only pass) and return a RawScan; version None means 5."""
    return RawScan(paths, version)
