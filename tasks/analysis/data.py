"""A counted scan as the analysis takes it: without its flyback column, densified and binned, positions
without complete frames filled from their neighbours (pure numpy)."""

from __future__ import annotations

import numpy as np

from counting.geometry import ALL_SECTORS, ScanShape
from counting.sparse import CountedScan


def drop_flyback(counted: CountedScan) -> CountedScan:
    """The scan without its flyback column (the last column of every row): width - 1 wide, as stempy's
    ``SparseArray.from_hdf5(keep_flyback=False)`` loads it. Events are shared, not copied."""
    h, w = counted.scan.height, counted.scan.width
    if w < 2:
        raise ValueError(
            f"the scan is {w} column wide: only a flyback column, no sample positions to analyse "
            "(analysis.keep_flyback keeps it)"
        )
    k = counted.frames_per_position

    def crop(a: np.ndarray) -> np.ndarray:
        return a.reshape(h, w, k)[:, : w - 1].reshape(h * (w - 1), k)

    return CountedScan(
        ScanShape(w - 1, h), crop(counted.events), crop(counted.sector_masks), counted.metadata
    )


def fill_missing_positions(dense: np.ndarray, valid: np.ndarray) -> int:
    """Replace patterns at positions where ``valid`` is False by the mean of their valid 4-neighbours.

    Works outwards in passes (a pass uses only positions known before it), so holes larger than one position
    fill from their rim inwards. Modifies ``dense`` (h, w, qx, qy) in place; returns positions filled."""
    h, w = valid.shape
    known = valid.copy()
    filled = 0
    while True:
        todo = np.argwhere(~known)
        if not len(todo):
            return filled
        done = []
        for y, x in todo:
            nbrs = [
                (y + dy, x + dx)
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
                if 0 <= y + dy < h and 0 <= x + dx < w and known[y + dy, x + dx]
            ]
            if nbrs:
                dense[y, x] = np.mean([dense[p] for p in nbrs], axis=0)
                done.append((y, x))
        if not done:  # nothing valid anywhere: leave the data as it is
            return filled
        for y, x in done:
            known[y, x] = True
        filled += len(done)


def densify(counted: CountedScan, bin_frames: int, fill_incomplete: bool = True) -> tuple[np.ndarray, int]:
    """Binned dense float32 patterns (h, w, 576/bin, 576/bin), frames of a position summed; and positions filled.

    Positions with no frame at all are always filled from their neighbours (as the paper's utils replace
    all-zero patterns); with ``fill_incomplete`` so are positions missing a frame or a sector, since a
    missing 144-row sector moves the centre of mass far more than any sample does."""
    dense = counted.to_dense(bin_frames, np.float32)
    masks = counted.sector_masks.reshape(counted.scan.height, counted.scan.width, -1)
    valid = (masks == ALL_SECTORS).all(axis=-1) if fill_incomplete else (masks != 0).any(axis=-1)
    if valid.all():
        return dense, 0
    return dense, fill_missing_positions(dense, valid)
