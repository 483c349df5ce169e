"""Counted scans in stempy's sparse HDF5 layout (format version 3), plus a sector-completeness mask.

Layout written (stempy's SparseArray.from_hdf5 reads it; it ignores what it does not know):

    /                                  attrs: version = 3
    /electron_events/frames            vlen uint32, (positions * k,), attrs Nx = Ny = 576
    /electron_events/scan_positions    int64 arange(positions), attrs Nx = scan width, Ny = scan height
    /electron_events/sector_masks      uint8 (positions, k): bit m set when sector m of that frame arrived;
                                       0b1111 complete, 0 = no frame at all in that slot
    /metadata/electron_counting        attrs: thresholds and statistics (stempy's keys)
    /metadata/stemstream               attrs: provenance and completeness counters

Frame j at position p is element p*k + j; k is the most frames any position has, and positions with
fewer frames get empty event lists (and mask 0) in the remaining slots, exactly as stempy pads them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from h5py import h5s

from counting.errors import PermanentError
from counting.geometry import ALL_SECTORS, FRAME_COLS, FRAME_ROWS, ScanShape
from counting.kernel import EventList
from counting.storage.attrs import load_tree, save_tree
from counting.storage.hdf5 import TempHDF5

FORMAT_VERSION = 3
_VLEN_U32 = h5py.vlen_dtype(np.uint32)
_CHUNK = 16384  # frame slots per HDF5 write
_POSITIONS_CHUNK = 1 << 20  # scan positions per HDF5 write


class SparseFormatError(PermanentError, ValueError):
    """A file is not a readable counted scan."""


@dataclass
class CountedScan:
    """Events of a whole scan, indexed [position, frame slot], with per-frame sector masks."""

    scan: ScanShape
    events: np.ndarray  # object (positions, k) of uint32 arrays
    sector_masks: np.ndarray  # uint8 (positions, k)
    metadata: dict = field(default_factory=dict)

    @property
    def frames_per_position(self) -> int:
        """Frame slots per position (k)."""
        return int(self.events.shape[1])

    @property
    def num_frames(self) -> int:
        """Frames that arrived (slots with at least one sector)."""
        return int(np.count_nonzero(self.sector_masks))

    @property
    def num_events(self) -> int:
        """Total electron events in the scan."""
        return int(sum(len(e) for e in self.events.ravel()))

    @property
    def complete_frames(self) -> int:
        """Frames with all four sectors."""
        return int(np.count_nonzero(self.sector_masks == ALL_SECTORS))

    @property
    def position_complete(self) -> np.ndarray:
        """(height, width) bool: every frame slot of the position holds all four sectors."""
        ok = (self.sector_masks == ALL_SECTORS).all(axis=1)
        return ok.reshape(self.scan.height, self.scan.width)

    def to_dense(self, bin_factor: int = 1, dtype: type = np.uint16) -> np.ndarray:
        """Summed diffraction patterns (height, width, 576/bin, 576/bin): frames of a position added."""
        if FRAME_ROWS % bin_factor or bin_factor < 1:
            raise ValueError(f"bin factor must divide 576, got {bin_factor}")
        q = FRAME_ROWS // bin_factor
        flat = [e for e in self.events.ravel()]
        sizes = np.fromiter((len(e) for e in flat), np.int64, len(flat))
        idx = np.concatenate(flat).astype(np.int64) if sizes.sum() else np.empty(0, np.int64)
        pos = np.repeat(np.arange(len(flat)) // self.frames_per_position, sizes)
        row, col = np.divmod(idx, FRAME_COLS)
        binned = (row // bin_factor) * q + col // bin_factor
        counts = np.bincount(pos * q * q + binned, minlength=self.scan.positions * q * q)
        return counts.astype(dtype).reshape(self.scan.height, self.scan.width, q, q)

    @property
    def completeness(self) -> float:
        """Fraction of expected sectors that arrived (positions * k * 4 expected)."""
        bits = np.unpackbits(self.sector_masks.astype(np.uint8)[..., None], axis=-1).sum()
        return float(bits) / (self.sector_masks.size * 4) if self.sector_masks.size else 0.0


class ScanAccumulator:
    """Collects counted frames of one scan in any order and lays them out by position and frame number."""

    def __init__(self, scan: ScanShape):
        self.scan = scan
        self._positions: list[np.ndarray] = []
        self._frame_numbers: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._events: list[np.ndarray] = []

    def add(
        self, positions: np.ndarray, frame_numbers: np.ndarray, sector_masks: np.ndarray, events: EventList
    ) -> None:
        """Add a counted batch; arrays are per frame and aligned with ``events``."""
        positions = np.asarray(positions, np.int64)
        if (
            len(positions) != len(events)
            or len(frame_numbers) != len(events)
            or len(sector_masks) != len(events)
        ):
            raise ValueError("positions, frame numbers, masks and events must have one entry per frame")
        if len(positions) and (positions.min() < 0 or positions.max() >= self.scan.positions):
            raise ValueError(f"scan position out of range for a {self.scan.width}x{self.scan.height} scan")
        self._positions.append(positions)
        self._frame_numbers.append(np.asarray(frame_numbers, np.int64))
        self._masks.append(np.asarray(sector_masks, np.uint8))
        self._events.extend(events.to_list())

    def finish(self, metadata: dict | None = None, frames_per_position: int = 1) -> CountedScan:
        """Lay frames out as [position, slot] in ascending frame number per position."""
        positions = np.concatenate(self._positions) if self._positions else np.empty(0, np.int64)
        numbers = np.concatenate(self._frame_numbers) if self._frame_numbers else np.empty(0, np.int64)
        masks = np.concatenate(self._masks) if self._masks else np.empty(0, np.uint8)
        order = np.lexsort((numbers, positions))
        per_position = np.bincount(positions, minlength=self.scan.positions)
        k = max(int(per_position.max(initial=0)), frames_per_position, 1)
        events = np.empty((self.scan.positions, k), dtype=object)
        empty = np.empty(0, np.uint32)
        for idx in np.ndindex(events.shape):
            events[idx] = empty
        out_masks = np.zeros((self.scan.positions, k), np.uint8)
        slot = np.zeros(self.scan.positions, np.int64)
        for i in order:
            p = positions[i]
            events[p, slot[p]] = self._events[i]
            out_masks[p, slot[p]] = masks[i]
            slot[p] += 1
        return CountedScan(self.scan, events, out_masks, dict(metadata or {}))


def write_counted_scan(path: str | os.PathLike, scan: CountedScan) -> Path:
    """Write a counted scan atomically, straight to disk in chunks (counting.storage.hdf5); a storage failure
    raises OSError and leaves no file behind, and an existing file is never replaced (FileExistsError). A
    complete file that cannot be named (h5_storage.UnnamedFileError) is kept, never removed."""
    path = Path(path)
    with TempHDF5(path.parent, path.name, reserve=estimated_file_size(scan)) as tmp:
        _write_layout(tmp.h5, scan)
        tmp.close()
        tmp.link(path)
    return path


def counted_scan_image(scan: CountedScan) -> bytes:
    """The scan's HDF5 file as bytes, built in memory (for tests and small scans)."""
    name = f"stemstream-image-{uuid.uuid4().hex}"  # the core driver tells open files apart by name
    with h5py.File(name, "w", driver="core", backing_store=False) as f:
        _write_layout(f, scan)
        f.flush()
        return f.id.get_file_image()


def estimated_file_size(scan: CountedScan) -> int:
    """About the bytes of the scan's file: its events, HDF5's 32 bytes per frame slot, masks, metadata."""
    events = sum(len(e) for e in scan.events.ravel())
    return 4 * events + 40 * scan.events.size + 8 * scan.scan.positions + (64 << 10)


def create_layout(f: h5py.File, scan: ScanShape, slots: int) -> h5py.Dataset:
    """Everything known before the events: the version, the scan positions dataset (its values come with
    finish_layout: nothing in proportion to the scan is written or held before data arrives), and the empty
    frames dataset of ``slots`` entries (positions * frames per position), which is returned."""
    f.attrs["version"] = FORMAT_VERSION
    group = f.create_group("electron_events")
    sp = group.create_dataset("scan_positions", (scan.positions,), dtype=np.int64)
    sp.attrs["Nx"] = scan.width
    sp.attrs["Ny"] = scan.height
    frames = group.create_dataset("frames", (slots,), dtype=_VLEN_U32)
    frames.attrs["Nx"] = FRAME_ROWS
    frames.attrs["Ny"] = FRAME_COLS
    return frames


def write_slots(frames: h5py.Dataset, start: int, events: Sequence[np.ndarray]) -> None:
    """Write consecutive frame slots start, start+1, ... (uint32 event arrays), in one HDF5 write."""
    n = len(events)
    if n == 0:
        return
    data = np.empty(n, dtype=_VLEN_U32)
    for i, e in enumerate(events):  # element by element: equal-length arrays must not become 2-D
        data[i] = np.ascontiguousarray(e, dtype=np.uint32)
    file_space = frames.id.get_space()
    file_space.select_hyperslab((start,), (n,))
    frames.id.write(h5s.create_simple((n,)), file_space, data)


def finish_layout(f: h5py.File, sector_masks: np.ndarray, metadata: dict) -> None:
    """What is known at the end: the scan positions (0, 1, ... in chunks), the sector masks (positions,
    frames per position) and the metadata."""
    group = f["electron_events"]
    positions = group["scan_positions"]
    for start in range(0, positions.shape[0], _POSITIONS_CHUNK):
        stop = min(start + _POSITIONS_CHUNK, positions.shape[0])
        positions[start:stop] = np.arange(start, stop, dtype=np.int64)
    masks = group.create_dataset("sector_masks", data=np.asarray(sector_masks, np.uint8))
    masks.attrs["description"] = "bit m set when sector (module) m of the frame arrived; 15 = complete"
    save_tree(f.create_group("metadata"), metadata)


def _write_layout(f: h5py.File, scan: CountedScan) -> None:
    frames = create_layout(f, scan.scan, scan.events.size)
    flat = scan.events.ravel()
    for start in range(0, len(flat), _CHUNK):
        write_slots(frames, start, flat[start : start + _CHUNK])
    finish_layout(f, scan.sector_masks, scan.metadata)


def read_counted_scan(path: str | os.PathLike) -> CountedScan:
    """Read a counted scan written by stemstream or stempy (version 3 layout)."""
    path = Path(path)
    if not path.is_file():
        raise SparseFormatError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            return _read_layout(f, path)
    except OSError as exc:
        raise SparseFormatError(f"{path}: not a readable HDF5 file ({exc})") from exc
    except KeyError as exc:
        raise SparseFormatError(f"{path}: missing {exc} (not a stempy-format counted scan)") from exc


def _read_layout(f: h5py.File, path: Path) -> CountedScan:
    version = int(f.attrs.get("version", 1))
    if version != FORMAT_VERSION:
        raise SparseFormatError(f"{path}: sparse format version {version} is not supported (expected 3)")
    sp = f["electron_events/scan_positions"]
    frames = f["electron_events/frames"]
    scan = ScanShape(int(sp.attrs["Nx"]), int(sp.attrs["Ny"]))
    if frames.shape[0] % scan.positions:
        raise SparseFormatError(
            f"{path}: {frames.shape[0]} frames do not divide into {scan.positions} scan positions"
        )
    k = frames.shape[0] // scan.positions
    events = np.empty((scan.positions, k), dtype=object)
    events.ravel()[:] = list(frames[()]) if frames.shape[0] else []
    if "sector_masks" in f["electron_events"]:
        masks = f["electron_events/sector_masks"][()].astype(np.uint8).reshape(scan.positions, k)
    else:  # stempy's own files carry no mask: every stored frame is taken as complete
        masks = np.full((scan.positions, k), ALL_SECTORS, np.uint8)
    metadata = load_tree(f["metadata"]) if "metadata" in f else {}
    return CountedScan(scan, events, masks, metadata)
