"""Block I/O: read the sectors of chosen blocks straight into frame memory, a run of blocks per syscall."""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np

from counting.raw.layout import BLOCK_BYTES, HEADER_BYTES, RawFormatError

# Two iovecs per block (header scratch + sector); stay well below the usual IOV_MAX of 1024.
_MAX_BLOCKS_PER_READ = 256


def read_blocks(handle: BinaryIO, offsets: np.ndarray, targets: list[np.ndarray]) -> None:
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
