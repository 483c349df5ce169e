"""Raw 4D Camera sector files (format v4 and v5): write them, index them, and read assembled frames.

A sector file is a flat sequence of blocks: a 16-byte little-endian header
``uint32 scan_number, uint32 frame_number, uint16 scan_width, uint16 scan_height, uint16 x, uint16 y``
followed by one sector of uint16 pixels (v5: 144 rows x 576 cols, rows m*144..; v4: 576 rows x 144 cols,
columns m*144..). The sector (module) index is only in the file name (``module<m>``), as in stempy.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np

from counting.errors import PermanentError
from counting.geometry import (
    ALL_SECTORS,
    FRAME_COLS,
    FRAME_ROWS,
    FRAME_SHAPE,
    N_SECTORS,
    SECTOR_BYTES,
    SECTOR_ROWS,
    FrameBatch,
    ScanShape,
)

PathLike = str | os.PathLike[str]

HEADER_BYTES = 16
# 165,904 bytes, identical for v4 and v5: the version cannot be sniffed from a file.
BLOCK_BYTES = HEADER_BYTES + SECTOR_BYTES
SUPPORTED_VERSIONS = (4, 5)
DEFAULT_VERSION = 5

# The header as stempy reads it (uint32[2] then uint16[4], host order = little-endian in practice).
_HEADER_FIELDS = [
    ("scan_number", "<u4"),
    ("frame_number", "<u4"),
    ("scan_width", "<u2"),
    ("scan_height", "<u2"),
    ("x", "<u2"),
    ("y", "<u2"),
]
# Header fields only, but strided by a whole block, so a mapped file can be indexed without touching pixels.
_HEADER_VIEW_DTYPE = np.dtype(
    {
        "names": [name for name, _ in _HEADER_FIELDS],
        "formats": [fmt for _, fmt in _HEADER_FIELDS],
        "offsets": [0, 4, 8, 10, 12, 14],
        "itemsize": BLOCK_BYTES,
    }
)
_MODULE_RE = re.compile(r"module(\d+)")
# Two iovecs per block (header scratch + sector); stay well below the usual IOV_MAX of 1024.
_MAX_BLOCKS_PER_READ = 256
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF


class RawFormatError(PermanentError, ValueError):
    """A raw sector file (or set of files) is malformed; the message names the file and byte offset."""


def raw_file_name(scan_number: int, module: int, file_index: int = 0) -> str:
    """Return the production file name of one module file of a scan."""
    return f"data_scan{scan_number:010d}_module{module}_dst0_file{file_index}.data"


def sector_shape(version: int) -> tuple[int, int]:
    """Return the on-disk (rows, cols) of one sector for a file format version."""
    _check_version(version)
    return (SECTOR_ROWS, FRAME_COLS) if version == 5 else (FRAME_ROWS, SECTOR_ROWS)


def block_dtype(version: int) -> np.dtype:
    """Return the numpy structured dtype of one header+sector block for a file format version."""
    return np.dtype([*_HEADER_FIELDS, ("data", "<u2", sector_shape(version))])


def module_from_path(path: PathLike) -> int:
    """Return the sector (module) index encoded as ``module<m>`` in a file name."""
    name = Path(path).name
    match = _MODULE_RE.search(name)
    if match is None:
        raise RawFormatError(f"{path}: file name has no 'module<N>' part, so its sector is unknown")
    module = int(match.group(1))
    if not 0 <= module < N_SECTORS:
        raise RawFormatError(f"{path}: module {module} in file name is not in 0..{N_SECTORS - 1}")
    return module


def _check_version(version: int) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"raw format version must be one of {SUPPORTED_VERSIONS}, got {version!r}")


def _sector_slice(version: int, module: int) -> tuple[slice, slice]:
    """Where sector `module` sits in a 576x576 frame: a row strip (v5) or a column strip (v4)."""
    strip = slice(module * SECTOR_ROWS, (module + 1) * SECTOR_ROWS)
    return (strip, slice(None)) if version == 5 else (slice(None), strip)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def write_raw_scan(
    directory: PathLike,
    scan_number: int,
    scan: ScanShape,
    frames: Iterable[FrameBatch],
    version: int = DEFAULT_VERSION,
    files_per_module: int = 1,
) -> list[Path]:
    """Write frame batches as the four module files of a raw scan; return the paths (module-major)."""
    _check_version(version)
    _check_writable_scan(scan_number, scan)
    if files_per_module < 1:
        raise ValueError(f"files_per_module must be >= 1, got {files_per_module}")
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        [out_dir / raw_file_name(scan_number, m, k) for k in range(files_per_module)]
        for m in range(N_SECTORS)
    ]
    with ExitStack() as stack:
        handles = [[stack.enter_context(open(p, "wb")) for p in row] for row in paths]
        ordinal = 0  # frames written so far: round-robin over a module's files follows it
        for batch in frames:
            _check_batch(batch, scan)
            file_of_frame = (ordinal + np.arange(len(batch))) % files_per_module
            for module in range(N_SECTORS):
                present = ((batch.sector_masks.astype(np.int64) >> module) & 1).astype(bool)
                for k, handle in enumerate(handles[module]):
                    selected = np.flatnonzero(present & (file_of_frame == k))
                    if selected.size:
                        _encode_blocks(batch, selected, module, scan_number, scan, version).tofile(handle)
            ordinal += len(batch)
    return [p for row in paths for p in row]


def _check_writable_scan(scan_number: int, scan: ScanShape) -> None:
    if not 0 <= scan_number <= _U32_MAX:
        raise ValueError(f"scan_number must fit in uint32, got {scan_number}")
    if scan.width > _U16_MAX or scan.height > _U16_MAX:
        raise ValueError(f"scan shape must fit in uint16, got {scan.width}x{scan.height}")


def _check_batch(batch: FrameBatch, scan: ScanShape) -> None:
    if len(batch) == 0:
        return
    positions = np.asarray(batch.positions)
    if positions.min() < 0 or positions.max() >= scan.positions:
        raise ValueError(
            f"batch positions must be in 0..{scan.positions - 1} for a {scan.width}x{scan.height} scan"
        )
    numbers = np.asarray(batch.frame_numbers)
    if numbers.min() < 0 or numbers.max() > _U32_MAX:
        raise ValueError("batch frame_numbers must fit in uint32")


def _encode_blocks(
    batch: FrameBatch, selected: np.ndarray, module: int, scan_number: int, scan: ScanShape, version: int
) -> np.ndarray:
    """Build the on-disk blocks of sector `module` for the selected frames of a batch."""
    positions = np.asarray(batch.positions)[selected]
    blocks = np.empty(selected.size, dtype=block_dtype(version))
    blocks["scan_number"] = scan_number
    blocks["frame_number"] = np.asarray(batch.frame_numbers)[selected]
    blocks["scan_width"] = scan.width
    blocks["scan_height"] = scan.height
    blocks["x"] = positions % scan.width
    blocks["y"] = positions // scan.width
    rows, cols = _sector_slice(version, module)
    blocks["data"] = batch.frames[selected, rows, cols]
    return blocks


# --------------------------------------------------------------------------------------------------
# Indexing (header-only pass)
# --------------------------------------------------------------------------------------------------


class _FileHeaders:
    """Header fields of every block of one file, read without touching the pixel data."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise RawFormatError(f"{path}: no such file") from None
        if not path.is_file():
            raise RawFormatError(f"{path}: not a regular file")
        self.size = size
        self.num_blocks, partial = divmod(size, BLOCK_BYTES)
        if partial:
            raise RawFormatError(
                f"{path}: truncated block at byte {self.num_blocks * BLOCK_BYTES} "
                f"(file is {size} bytes; a block is {BLOCK_BYTES} bytes)"
            )
        self.fields = _read_header_fields(path, self.num_blocks)

    def offset(self, block: int) -> int:
        """Byte offset of a block in this file."""
        return int(block) * BLOCK_BYTES


def _read_header_fields(path: Path, num_blocks: int) -> dict[str, np.ndarray]:
    """Read each header field at its native width (small index) through a strided view of the mapped file."""
    if num_blocks == 0:
        return {name: np.zeros(0, dtype=fmt) for name, fmt in _HEADER_FIELDS}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            # Only one page per block is needed; default readahead would pull most of the pixels in.
            mapped.madvise(mmap.MADV_RANDOM)
        view = np.ndarray((num_blocks,), dtype=_HEADER_VIEW_DTYPE, buffer=mapped)
        fields = {name: view[name].astype(fmt) for name, fmt in _HEADER_FIELDS}
        del view  # release the buffer export before the mmap closes
    return fields


def _first_bad(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _validate_file(headers: _FileHeaders, scan_number: int, width: int, height: int) -> None:
    """Check every block header of one file against the scan identity taken from the first block."""
    f = headers.fields
    checks = [
        ((f["scan_width"] == 0) | (f["scan_height"] == 0), "header scan shape is zero"),
        (
            f["scan_number"] != scan_number,
            f"scan_number differs from {scan_number} (first block of the scan)",
        ),
        (
            (f["scan_width"] != width) | (f["scan_height"] != height),
            f"scan shape differs from {width}x{height} (first block of the scan)",
        ),
        ((f["x"] >= f["scan_width"]) | (f["y"] >= f["scan_height"]), "scan position outside the scan"),
    ]
    for bad, what in checks:
        block = _first_bad(bad)
        if block is not None:
            raise RawFormatError(
                f"{headers.path}: {what} in block at byte {headers.offset(block)}: "
                f"scan_number={f['scan_number'][block]} frame_number={f['frame_number'][block]} "
                f"shape={f['scan_width'][block]}x{f['scan_height'][block]} "
                f"x={f['x'][block]} y={f['y'][block]}"
            )


class _BlockTable:
    """All blocks of all files as flat arrays (one entry per sector block)."""

    def __init__(self, files: list[_FileHeaders], modules: list[int], width: int) -> None:
        counts = [h.num_blocks for h in files]
        self.file = np.repeat(np.arange(len(files), dtype=np.int32), counts)
        self.block = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
        self.module = np.repeat(np.asarray(modules, dtype=np.int8), counts)
        self.frame_number = np.concatenate([h.fields["frame_number"] for h in files]).astype(np.int64)
        x = np.concatenate([h.fields["x"] for h in files]).astype(np.int64)
        y = np.concatenate([h.fields["y"] for h in files]).astype(np.int64)
        self.position = y * width + x

    def where(self, files: list[_FileHeaders], i: int) -> str:
        """Human-readable location of block i: file and byte offset."""
        return f"{files[self.file[i]].path} at byte {int(self.block[i]) * BLOCK_BYTES}"


def _check_unique_sectors(table: _BlockTable, files: list[_FileHeaders]) -> np.ndarray:
    """Fail when a frame number has two blocks for one module; return the order sorting by (frame, module)."""
    order = np.lexsort((table.module, table.frame_number))
    key = table.frame_number[order] * N_SECTORS + table.module[order]
    dup = _first_bad(key[1:] == key[:-1])
    if dup is not None:
        first, second = order[dup], order[dup + 1]
        raise RawFormatError(
            f"{files[table.file[second]].path}: frame_number {table.frame_number[second]} appears twice for "
            f"module {table.module[second]} (block at byte {int(table.block[second]) * BLOCK_BYTES}; "
            f"first seen in {table.where(files, first)})"
        )
    return order


def _check_positions_agree(table: _BlockTable, files: list[_FileHeaders], order: np.ndarray) -> None:
    """Fail when the modules of one frame disagree on its scan position."""
    numbers = table.frame_number[order]
    positions = table.position[order]
    starts = np.flatnonzero(np.r_[True, numbers[1:] != numbers[:-1]])
    first_of_group = np.repeat(starts, np.diff(np.r_[starts, numbers.size]))
    bad = _first_bad(positions != positions[first_of_group])
    if bad is not None:
        this, ref = order[bad], order[first_of_group[bad]]
        raise RawFormatError(
            f"{files[table.file[this]].path}: frame_number {table.frame_number[this]} is at position "
            f"{table.position[this]} in block at byte {int(table.block[this]) * BLOCK_BYTES} but at position "
            f"{table.position[ref]} in {table.where(files, ref)}"
        )


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class RawScan:
    """An indexed set of raw sector files of one scan; yields assembled frames in frame-number order."""

    def __init__(self, paths: Sequence[PathLike] | PathLike, version: int | None = None) -> None:
        self._version = DEFAULT_VERSION if version is None else version
        _check_version(self._version)
        path_list = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
        if not path_list:
            raise RawFormatError("no raw files given")
        self._paths = tuple(Path(p) for p in path_list)
        _check_distinct(self._paths)
        modules = [module_from_path(p) for p in self._paths]
        files = [_FileHeaders(p) for p in self._paths]
        self._scan_number, self._scan_shape = _scan_identity(files)
        for headers in files:
            _validate_file(headers, self._scan_number, self._scan_shape.width, self._scan_shape.height)
        self._build_index(files, modules)

    def _build_index(self, files: list[_FileHeaders], modules: list[int]) -> None:
        table = _BlockTable(files, modules, self._scan_shape.width)
        order = _check_unique_sectors(table, files)
        _check_positions_agree(table, files, order)
        numbers, frame_of_block = np.unique(table.frame_number, return_inverse=True)
        n = numbers.size
        self._frame_numbers = numbers.astype(np.int64)
        self._positions = np.empty(n, dtype=np.int64)
        self._positions[frame_of_block] = table.position
        # Per (frame, module): which file holds the sector (-1 = missing) and at which byte offset.
        self._sector_file = np.full((n, N_SECTORS), -1, dtype=np.int32)
        self._sector_file[frame_of_block, table.module] = table.file
        self._sector_offset = np.zeros((n, N_SECTORS), dtype=np.int64)
        self._sector_offset[frame_of_block, table.module] = table.block * BLOCK_BYTES
        present = self._sector_file >= 0
        self._masks = (present * (1 << np.arange(N_SECTORS))).sum(axis=1).astype(np.uint8)
        self._sector_count = int(table.file.size)
        self._per_position = np.bincount(self._positions, minlength=self._scan_shape.positions)

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

    def summary(self) -> dict[str, int]:
        """Counts for a CLI or log line: frames, complete, incomplete, positions missing, files, sectors."""
        incomplete = int(np.count_nonzero(self._masks != ALL_SECTORS))
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
        s = self.summary()
        return (
            f"RawScan(scan_number={s['scan_number']}, shape={s['scan_width']}x{s['scan_height']}, "
            f"frames={s['frames']}, incomplete={s['incomplete']}, files={s['files']}, v{self._version})"
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
            strip = _sector_slice(self._version, module)
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
            _read_blocks(handle, offsets, targets)
            return
        # A v4 sector is a column strip (strided in the frame): read contiguously, then scatter.
        scratch = np.empty((local.size, *sector_shape(4)), dtype=np.uint16)
        _read_blocks(handle, offsets, list(scratch))
        frames[(local, *strip)] = scratch


def open_raw_scan(paths: Sequence[PathLike] | PathLike, version: int | None = None) -> RawScan:
    """Index raw sector files (header-only pass) and return a RawScan; version None means 5."""
    return RawScan(paths, version)


def _check_distinct(paths: tuple[Path, ...]) -> None:
    """A file listed twice would look like every frame arriving twice; say what really happened."""
    seen: set[Path] = set()
    for path in paths:
        key = path.resolve()
        if key in seen:
            raise RawFormatError(f"{path}: given twice in the list of raw files")
        seen.add(key)


def _scan_identity(files: list[_FileHeaders]) -> tuple[int, ScanShape]:
    """Scan number and shape from the first block of the first non-empty file."""
    for headers in files:
        if headers.num_blocks:
            f = headers.fields
            width, height = int(f["scan_width"][0]), int(f["scan_height"][0])
            if width == 0 or height == 0:
                raise RawFormatError(
                    f"{headers.path}: header scan shape is zero ({width}x{height}) in block at byte 0"
                )
            return int(f["scan_number"][0]), ScanShape(width, height)
    raise RawFormatError(f"no blocks in any of the {len(files)} files (first: {files[0].path})")


# --------------------------------------------------------------------------------------------------
# Block I/O
# --------------------------------------------------------------------------------------------------


def _read_blocks(handle: BinaryIO, offsets: np.ndarray, targets: list[np.ndarray]) -> None:
    """Read the sector of the block at each offset into the matching contiguous target array."""
    order = np.argsort(offsets, kind="stable")
    sorted_offsets = offsets[order]
    # Runs of adjacent blocks become one vectored read: one syscall, headers dropped into a scratch.
    breaks = np.flatnonzero(np.diff(sorted_offsets) != BLOCK_BYTES) + 1
    for run in np.split(np.arange(order.size), breaks):
        for chunk_start in range(0, run.size, _MAX_BLOCKS_PER_READ):
            chunk = run[chunk_start : chunk_start + _MAX_BLOCKS_PER_READ]
            _read_run(handle, int(sorted_offsets[chunk[0]]), [targets[order[j]] for j in chunk])


def _read_run(handle: BinaryIO, offset: int, targets: list[np.ndarray]) -> None:
    """Read len(targets) consecutive blocks starting at `offset`, sectors into targets."""
    if hasattr(os, "preadv"):
        header = bytearray(HEADER_BYTES)
        buffers: list[memoryview | bytearray] = []
        for target in targets:
            buffers += [header, memoryview(target).cast("B")]
        if os.preadv(handle.fileno(), buffers, offset) == len(targets) * BLOCK_BYTES:
            return
    # Portable path, also the retry after a short vectored read (possible on network file systems).
    for i, target in enumerate(targets):
        _read_exact(handle, offset + i * BLOCK_BYTES + HEADER_BYTES, memoryview(target).cast("B"))


def _read_exact(handle: BinaryIO, offset: int, buffer: memoryview) -> None:
    handle.seek(offset)
    done = 0
    while done < len(buffer):
        got = handle.readinto(buffer[done:])
        if not got:
            raise RawFormatError(
                f"{handle.name}: file ended at byte {offset + done} while reading a sector "
                "(did it change after it was indexed?)"
            )
        done += got
