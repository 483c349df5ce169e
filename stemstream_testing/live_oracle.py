"""The live images computed again, plainly, from a written scan file: the oracle the live view is checked
against (same geometry, numpy only, one frame at a time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from counting.sparse import read_counted_scan


def live_sums_from_file(path: Path, cx: float, cy: float, r: float, inner: float, outer: float) -> dict:
    """Per-position BF and ADF counts, event counts, column and row sums, frames received; summed pattern."""
    scan = read_counted_scan(path)
    n = scan.scan.positions
    out = {k: np.zeros(n, np.int64) for k in ("counts", "bf", "adf", "sum_col", "sum_row")}
    out["pattern"] = np.zeros(576 * 576, np.int64)
    out["frames"] = np.count_nonzero(scan.sector_masks, axis=1).astype(np.int64)
    for p in range(n):
        for e in scan.events[p]:
            e = np.asarray(e, np.int64)
            row, col = e // 576, e % 576
            d2 = (row - cy) ** 2 + (col - cx) ** 2
            out["counts"][p] += len(e)
            out["bf"][p] += int(np.count_nonzero(d2 <= r * r))
            out["adf"][p] += int(np.count_nonzero((d2 > inner * inner) & (d2 <= outer * outer)))
            out["sum_col"][p] += int(col.sum())
            out["sum_row"][p] += int(row.sum())
            np.add.at(out["pattern"], e, 1)
    return out
