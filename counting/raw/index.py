"""Indexing: one header-only pass over a scan's files, validated, into a table of where each sector is.

Headers are read through a block-strided dtype over the mapped file, so the pixels are never touched;
every inconsistency is a RawFormatError naming the file and the byte offset of the block.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from counting.geometry import N_SECTORS, ScanShape
from counting.raw.layout import (
    BLOCK_BYTES,
    HEADER_FIELDS,
    HEADER_VIEW_DTYPE,
    RawFormatError,
    module_from_path,
)


@dataclass(frozen=True)
class ScanIndex:
    """Where every sector of a scan's frames is, by frame (ascending frame number)."""

    scan_number: int
    scan_shape: ScanShape
    frame_numbers: np.ndarray  # int64, ascending
    positions: np.ndarray  # int64 scan position of each frame
    sector_file: np.ndarray  # (frames, N_SECTORS) int32: index of the file holding a sector, -1 = missing
    sector_offset: np.ndarray  # (frames, N_SECTORS) int64: byte offset of its block in that file
    masks: np.ndarray  # uint8 arrived-sector bit mask of each frame
    sector_count: int  # sector blocks in all files
    per_position: np.ndarray  # frames found at each scan position


def index_scan(paths: tuple[Path, ...]) -> ScanIndex:
    """Read and cross-check every block header of the files; RawFormatError names file and byte offset."""
    if not paths:
        raise RawFormatError("no raw files given")
    _check_distinct(paths)
    modules = [module_from_path(p) for p in paths]
    files = [_FileHeaders(p) for p in paths]
    scan_number, shape = _scan_identity(files)
    for headers in files:
        _validate_file(headers, scan_number, shape.width, shape.height)
    table = _BlockTable(files, modules, shape.width)
    order = _check_unique_sectors(table, files)
    _check_positions_agree(table, files, order)
    numbers, frame_of_block = np.unique(table.frame_number, return_inverse=True)
    n = numbers.size
    positions = np.empty(n, dtype=np.int64)
    positions[frame_of_block] = table.position
    sector_file = np.full((n, N_SECTORS), -1, dtype=np.int32)
    sector_file[frame_of_block, table.module] = table.file
    sector_offset = np.zeros((n, N_SECTORS), dtype=np.int64)
    sector_offset[frame_of_block, table.module] = table.block * BLOCK_BYTES
    present = sector_file >= 0
    return ScanIndex(
        scan_number=scan_number,
        scan_shape=shape,
        frame_numbers=numbers.astype(np.int64),
        positions=positions,
        sector_file=sector_file,
        sector_offset=sector_offset,
        masks=(present * (1 << np.arange(N_SECTORS))).sum(axis=1).astype(np.uint8),
        sector_count=int(table.file.size),
        per_position=np.bincount(positions, minlength=shape.positions),
    )


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
        return {name: np.zeros(0, dtype=fmt) for name, fmt in HEADER_FIELDS}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            # Only one page per block is needed; default readahead would pull most of the pixels in.
            mapped.madvise(mmap.MADV_RANDOM)
        view = np.ndarray((num_blocks,), dtype=HEADER_VIEW_DTYPE, buffer=mapped)
        fields = {name: view[name].astype(fmt) for name, fmt in HEADER_FIELDS}
        del view  # release the buffer export before the mmap closes
    return fields


def _first_bad(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


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
