"""A counted scan written to disk while it streams in, so the writer's memory does not grow with the scan.

Why this design: the scan writer used to hold every counted frame of a scan and then build the whole HDF5
image in memory (HDF5 writing to disk itself fails badly on a full disk: see counting.storage.hdf5), so its
memory grew with the scan (~0.8 GB more for 512x512 at 200 electrons/frame). Two ways out were weighed:
spilling the events to a plain temporary file and assembling the HDF5 from it at the end, or writing the
HDF5 itself as the frames arrive. The second is used: the events are written once, the end of a scan only
adds the masks and metadata (its cost does not grow with the scan: the file is on disk seconds after the
last frame even for 262,144 frames), and no second copy of the events needs disk space. What made it safe
is counting.storage.hdf5: HDF5 writes through a file object that never passes it a storage error and
reserves disk space ahead of the writes, so a full disk is still one plain OSError and nothing half-written
keeps its final name.

Layout (counting.sparse): frame j of position p is slot p*k + j, with k the most frames any position
has, in ascending frame number per position. k is only known at the end, but almost every scan has one
frame per position, so the file is written as if k = 1: a position's first frame goes straight to its slot,
buffered briefly (``flush_frames``) so that consecutive positions go to disk in one HDF5 write. A second
frame for a position goes to a plain spill file beside it; at the end, if there was one, the file is
rewritten with k slots per position, in chunks, from the first file and the spill (slower, still flat).

Memory per scan: 10 bytes per position (first frame number, mask and flag), 4 per position for the frame
count, the buffer, and HDF5's bounded caches; the events themselves are never all in memory. The arrays
are zeroed (calloc), so only positions that get frames touch memory, and a shape above ``max_positions``
is refused (ScanTooLargeError) before anything is allocated for it.

A storage failure (OSError, or any error HDF5 raises while writing) stops the writing at once, removes the
temporary files and is kept in ``error``; the frames are still tallied, so the stop record can say what
arrived. ``finish`` raises it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from counting.errors import PermanentError
from counting.geometry import ALL_SECTORS, ScanShape
from counting.kernel import EventList
from counting.sparse import create_layout, finish_layout, write_slots
from counting.storage.hdf5 import FinalName, TempHDF5, create_temporary

_EMPTY = np.empty(0, np.uint32)
_REWRITE_CHUNK = 8192  # frame slots per step when rewriting with k > 1
MAX_POSITIONS = 4096 * 4096  # default cap on a scan's positions (its shape comes from the wire)


class ScanTooLargeError(PermanentError, ValueError):
    """A scan's shape has more positions than the writer is allowed to allocate for."""


@dataclass(frozen=True)
class ScanTally:
    """What arrived of a scan (as CountedScan reports it), whether or not it could be stored."""

    positions: int
    frames_per_position: int  # k
    num_frames: int  # frames that arrived (at least one sector)
    complete_frames: int  # frames with all four sectors
    num_events: int
    sector_bits: int  # sectors that arrived, all frames

    @property
    def completeness(self) -> float:
        """Fraction of expected sectors that arrived (positions * k * 4 expected)."""
        expected = self.positions * self.frames_per_position * 4
        return self.sector_bits / expected if expected else 0.0


class ScanFile:
    """One scan's HDF5, written under a temporary name in ``directory`` as counted frames arrive.

    ``add`` takes counted frames in any order; ``finish(metadata)`` completes the file (raises the storage
    error, if any); ``sha256()`` and ``link(path)`` then give its checksum and final name; ``discard()``
    removes whatever is left. ``add`` is called from one thread, the rest from one thread after it.
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        scan: ScanShape,
        flush_frames: int = 2048,
        max_positions: int = MAX_POSITIONS,
        final_name: FinalName | None = None,
    ) -> None:
        if scan.positions > max_positions:  # a shape from the wire: refuse before allocating for it
            raise ScanTooLargeError(
                f"a {scan.width}x{scan.height} scan has {scan.positions} positions, above the limit of "
                f"{max_positions}"
            )
        self.scan, self.directory, self.name = scan, directory, name
        self.error: Exception | None = None
        self._flush_frames = flush_frames
        self._final_name = final_name
        self._frames = self._complete = self._events = self._bits = 0
        self._buffer: list[tuple[int, np.ndarray]] = []  # (position, events) waiting for the next write
        self._spill: _Spill | None = None  # frames beyond a position's first
        self._file: TempHDF5 | None = None
        self._slots = None
        self._count = np.zeros(0, np.uint32)  # stays empty if the per-position arrays cannot be had
        try:
            # Zeroed arrays (calloc): memory is only touched for positions that get frames.
            n = scan.positions
            self._count = np.zeros(n, np.uint32)  # frames per position
            self._has_first = np.zeros(n, np.bool_)  # the position's first slot is taken
            self._first_number = np.zeros(n, np.int64)  # frame number in the position's first slot
            self._first_mask = np.zeros(n, np.uint8)
            self._file = TempHDF5(directory, name, final_name=final_name)
            self._slots = create_layout(self._file.h5, scan, n)
            self._file.storage.check()
        except Exception as exc:  # noqa: BLE001 - every storage or HDF5 error (or no memory) fails the scan
            self._fail(exc)

    # ------------------------------------------------------------------------------------------ frames
    def add(
        self, positions: np.ndarray, frame_numbers: np.ndarray, sector_masks: np.ndarray, events: EventList
    ) -> None:
        """Add a counted batch (arrays per frame, aligned with ``events``); ValueError if inconsistent."""
        positions = np.asarray(positions, np.int64)
        frame_numbers = np.asarray(frame_numbers, np.int64)
        masks = np.asarray(sector_masks, np.uint8)
        if not len(positions) == len(frame_numbers) == len(masks) == len(events):
            raise ValueError("positions, frame numbers, masks and events must have one entry per frame")
        if len(positions) and (positions.min() < 0 or positions.max() >= self.scan.positions):
            raise ValueError(f"scan position out of range for a {self.scan.width}x{self.scan.height} scan")
        arrived = masks != 0
        self._frames += int(np.count_nonzero(arrived))
        self._complete += int(np.count_nonzero(masks == ALL_SECTORS))
        self._bits += int(np.unpackbits(masks[:, None], axis=1).sum())
        self._events += int(events.offsets[-1] - events.offsets[0])
        if len(self._count):
            np.add.at(self._count, positions, 1)
        if self.error is not None:
            return
        try:
            for i in range(len(positions)):
                p = int(positions[i])
                if not self._has_first[p]:
                    self._has_first[p] = True
                    self._first_number[p] = frame_numbers[i]
                    self._first_mask[p] = masks[i]
                    self._buffer.append((p, events[i]))
                else:  # a second frame of this position (or a repeat within this batch)
                    if self._spill is None:
                        self._spill = _Spill(self.directory, self.name)
                    self._spill.add(p, int(frame_numbers[i]), int(masks[i]), events[i])
            if len(self._buffer) >= self._flush_frames:
                self._flush()
        except Exception as exc:  # noqa: BLE001 - see __init__
            self._fail(exc)

    def tally(self) -> ScanTally:
        """What arrived so far."""
        k = max(int(self._count.max(initial=0)), 1)
        return ScanTally(self.scan.positions, k, self._frames, self._complete, self._events, self._bits)

    # ------------------------------------------------------------------------------------------ the end
    def finish(self, metadata: dict) -> ScanTally:
        """Write what is buffered, the masks and the metadata, close and fsync; raises the storage error."""
        tally = self.tally()
        if self.error is None:
            try:
                self._flush()
                if tally.frames_per_position == 1:
                    finish_layout(self._file.h5, self._first_mask[:, None], metadata)
                else:
                    self._rewrite(tally.frames_per_position, metadata)
                self._file.close()
            except Exception as exc:  # noqa: BLE001 - see __init__
                self._fail(exc)
            finally:
                self._close_spill()
        if self.error is not None:
            raise self.error
        return tally

    def sha256(self) -> str:
        """Checksum of the finished file."""
        return self._file.sha256()

    def link(self, path: Path) -> None:
        """Give the finished file its final name (FileExistsError if taken: nothing is ever replaced;
        h5_storage.UnnamedFileError if the file system can name it neither way: the file is then kept)."""
        self._file.link(path)

    @property
    def complete(self) -> bool:
        """Finished and fsynced."""
        return self._file is not None and self._file.complete

    def settle(self) -> Path | None:
        """The writer's way out, whatever happened: temporary files are removed, but a finished file that
        has no final name is kept under a recoverable name beside it (h5_storage), and its path returned."""
        self._close_spill()
        return self._file.settle() if self._file is not None else None

    def discard(self) -> None:
        """Remove the temporary files (after a failure, or a scan that is not to be written)."""
        self._close_spill()
        if self._file is not None:
            self._file.discard()

    # ------------------------------------------------------------------------------------------ internal
    def _fail(self, exc: Exception) -> None:
        storage = self._file.storage.error if self._file is not None else None
        self.error = self.error or storage or exc  # the disk's own error, when it is the cause
        self._buffer = []
        self.discard()

    def _flush(self) -> None:
        if not self._buffer:
            return
        self._buffer.sort(key=lambda pe: pe[0])
        run_start = 0
        for i in range(1, len(self._buffer) + 1):
            if i == len(self._buffer) or self._buffer[i][0] != self._buffer[i - 1][0] + 1:
                run = self._buffer[run_start:i]
                write_slots(self._slots, run[0][0], [e for _, e in run])
                run_start = i
        self._buffer = []
        self._file.storage.check()  # stop at the first storage error, not at the end

    def _rewrite(self, k: int, metadata: dict) -> None:
        """Lay the scan out again with k slots per position: first frames from the file, the others from
        the spill, each position's frames in ascending frame number."""
        old, old_slots = self._file, self._slots
        self._file = TempHDF5(self.directory, self.name, final_name=self._final_name)
        slots = create_layout(self._file.h5, self.scan, self.scan.positions * k)
        masks = np.zeros((self.scan.positions, k), np.uint8)
        extra = self._spill.index()  # sorted by position, then frame number
        step = max(_REWRITE_CHUNK // k, 1)  # positions per step: its memory does not grow with k
        try:
            for a in range(0, self.scan.positions, step):
                b = min(a + step, self.scan.positions)
                firsts = old_slots[a:b]
                lo, hi = np.searchsorted(extra["position"], [a, b])
                per_position: dict[int, list] = {}
                for row in extra[lo:hi]:
                    p = int(row["position"])
                    per_position.setdefault(p, []).append(
                        (int(row["number"]), int(row["mask"]), self._spill.events(row))
                    )
                chunk = [_EMPTY] * ((b - a) * k)
                for p in range(a, b):
                    frames = per_position.get(p, [])
                    if self._has_first[p]:
                        frames.append((int(self._first_number[p]), int(self._first_mask[p]), firsts[p - a]))
                    frames.sort(key=lambda f: f[0])
                    for j, (_, mask, events) in enumerate(frames):
                        chunk[(p - a) * k + j] = events
                        masks[p, j] = mask
                write_slots(slots, a * k, chunk)
                self._file.storage.check()
            finish_layout(self._file.h5, masks, metadata)
        finally:
            old.discard()

    def _close_spill(self) -> None:
        if self._spill is not None:
            spill, self._spill = self._spill, None
            spill.discard()


_INDEX = np.dtype(
    [
        ("position", np.int64),
        ("number", np.int64),
        ("mask", np.uint8),
        ("offset", np.int64),
        ("count", np.int64),
    ]
)


class _Spill:
    """Frames beyond a position's first: events appended to a plain temporary file, a small index in
    memory (rare: only scans with several frames per position have any)."""

    def __init__(self, directory: Path, name: str) -> None:
        self._fd, self._path = create_temporary(directory, name, "frames")
        self._size = 0
        self._rows: list[tuple[int, int, int, int, int]] = []

    def add(self, position: int, number: int, mask: int, events: np.ndarray) -> None:
        data = np.ascontiguousarray(events, np.uint32).tobytes()
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], self._size + done)
        self._rows.append((position, number, mask, self._size, len(events)))
        self._size += len(data)

    def index(self) -> np.ndarray:
        rows = np.array(self._rows, dtype=_INDEX)
        return rows[np.lexsort((rows["number"], rows["position"]))]

    def events(self, row: np.void) -> np.ndarray:
        n = int(row["count"])
        data = os.pread(self._fd, 4 * n, int(row["offset"]))
        if len(data) != 4 * n:
            raise OSError(f"spill file {self._path} is shorter than what was written to it")
        return np.frombuffer(data, np.uint32)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(OSError):
            self._path.unlink(missing_ok=True)
