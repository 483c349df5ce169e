"""Dark scans through the streaming path: each node adds the raw frames it assembles into per-pixel sums
(counting.dark.stats.DarkSums) while it counts them as usual, and leaves its share of the scan's sums
beside the scans it writes, for the dark flow to add up (flows/dark.py: ``stemstream dark --scan-dir``).

On when ``streaming.accumulate_dark`` is set for a session (the dark session: beam blanked). Only frames
with all four sectors are added (a missing sector is zeros, not dark). A node's share of scan n is
``<output_dir>/.stemstream/dark-sums/scan<n:05d>-<scan key>-<node>.npz``, written when the node has
finished the scan (temporary name, then rename). The sums cost the node process one float64 add of each
frame (~1 ms per frame): a dark scan is hundreds to thousands of frames, not a live acquisition.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from counting.dark.stats import DarkSums
from counting.geometry import ALL_SECTORS

log = logging.getLogger(__name__)

SUMS_DIR = Path(".stemstream") / "dark-sums"
_NAME = re.compile(r"^scan(\d{5,})-(.*)-([^-]+)\.npz$")


def sums_dir(output_dir: Path) -> Path:
    """Where nodes leave their shares of dark scans."""
    return Path(output_dir) / SUMS_DIR


class NodeDarkSums:
    """One node's sums of the scans it takes part in (one scan at a time, as the node)."""

    def __init__(self, output_dir: Path, node: str) -> None:
        self.directory = sums_dir(output_dir)
        self.node = re.sub(r"[^A-Za-z0-9_.]", "_", node)
        self._key: tuple[int, str] | None = None
        self._sums = DarkSums()

    def add(self, scan_number: int, scan_key: str, frames: np.ndarray, masks: np.ndarray) -> None:
        """Add a sealed slot's complete frames (frames[:n], masks[:n]) to scan ``scan_number``'s sums."""
        if self._key != (scan_number, scan_key):
            self._key, self._sums = (scan_number, scan_key), DarkSums()
        complete = np.flatnonzero(np.asarray(masks) == ALL_SECTORS)
        if len(complete) == len(masks):
            self._sums.add(frames)
        elif len(complete):
            self._sums.add(frames[complete])

    def finish(self, scan_number: int, scan_key: str) -> Path | None:
        """Write this node's share of the scan (even when it had no frames: the flow then knows it ended);
        None (logged) when it cannot be written."""
        sums = self._sums if self._key == (scan_number, scan_key) else DarkSums()
        self._key, self._sums = None, DarkSums()
        key = re.sub(r"[^A-Za-z0-9_.]", "_", scan_key) or "nokey"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return sums.save(self.directory / f"scan{scan_number:05d}-{key}-{self.node}.npz")
        except OSError as exc:
            log.error("%s: cannot write the dark sums of scan %d: %s", self.node, scan_number, exc)
            return None


@dataclass(frozen=True)
class ScanSums:
    """The nodes' shares of one dark scan, added up."""

    scan_number: int
    scan_key: str
    files: list[Path]
    sums: DarkSums


def scan_sums(output_dir: Path, scan_number: int | None = None) -> ScanSums:
    """Add up the nodes' shares of a dark scan in ``output_dir`` (the newest scan with shares when
    ``scan_number`` is None; of several scans with that number, the newest). ValueError if there are none."""
    directory = sums_dir(output_dir)
    found: dict[tuple[int, str], list[Path]] = {}
    for path in directory.glob("scan*.npz") if directory.is_dir() else []:
        m = _NAME.match(path.name)
        if m and (scan_number is None or int(m.group(1)) == scan_number):
            found.setdefault((int(m.group(1)), m.group(2)), []).append(path)
    if not found:
        what = f"scan {scan_number}" if scan_number is not None else "any scan"
        raise ValueError(
            f"no dark sums of {what} in {directory} (was the session run with streaming.accumulate_dark?)"
        )
    (number, key), files = max(found.items(), key=lambda kv: max(p.stat().st_mtime for p in kv[1]))
    total = DarkSums()
    for path in sorted(files):
        total.merge(DarkSums.load(path))
    return ScanSums(number, key, sorted(files), total)
