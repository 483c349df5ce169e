"""Offline counting of raw 4D Camera files into one counted scan (what `stemstream count` runs)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from counting.pipeline import CountingOptions, count_batches
from counting.raw import PathLike, RawScan
from counting.sparse import CountedScan


def count_raw_scan(
    raw: RawScan,
    dark: np.ndarray | None,
    options: CountingOptions,
    gain: np.ndarray | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> CountedScan:
    """Count every frame of an indexed raw scan; incomplete frames are counted and flagged in the mask."""
    t0 = time.perf_counter()
    summary = raw.summary()
    counted = count_batches(
        raw.iter_batches(batch_size, reuse_buffer=True),
        raw.scan_shape,
        dark,
        options,
        gain,
        metadata={"stemstream": {"source": "raw files", "scan_number": raw.scan_number, **summary}},
        frames_per_position=raw.frames_per_position,
        progress=progress,
    )
    counted.metadata["stemstream"]["elapsed_seconds"] = round(time.perf_counter() - t0, 6)
    return counted


def raw_paths(inputs: Sequence[PathLike]) -> list[Path]:
    """Expand directories to their *.data files; keep files as given."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.data"))
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no *.data raw files")
            paths.extend(found)
        else:
            paths.append(p)
    return paths
