"""Writing: frame batches to the module files of a raw scan, as the camera's receivers write them."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from counting.geometry import N_SECTORS, FrameBatch, ScanShape
from counting.raw.layout import (
    DEFAULT_VERSION,
    PathLike,
    block_dtype,
    check_version,
    raw_file_name,
    sector_slice,
)

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF


def write_raw_scan(
    directory: PathLike,
    scan_number: int,
    scan: ScanShape,
    frames: Iterable[FrameBatch],
    version: int = DEFAULT_VERSION,
    files_per_module: int = 1,
) -> list[Path]:
    """Write frame batches as the four module files of a raw scan; return the paths (module-major)."""
    check_version(version)
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
    rows, cols = sector_slice(version, module)
    blocks["data"] = batch.frames[selected, rows, cols]
    return blocks
