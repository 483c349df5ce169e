"""A written counted scan replayed through the live images: its frames, in scan order and in batches, handed
to the same LivePublisher the nodes use (the view and its images are the live ones, nothing computed twice),
paced at a frame rate or as fast as it goes. Nothing here starts the view: the caller (flows.cli.view) does,
and gives the address of its snapshot intake.

From the file (counting.sparse's layout): its shape, frames per position (k) and sector masks (a slot with
mask 0 holds no frame and is not replayed; incomplete frames are replayed as they are), its scan number, and
the microscope's calibrations (/metadata/microscope) for analyses that need them. The writer stores no BF
geometry, so the images use live.bf_center/bf_radius when set, else the publisher estimates it as a node
does, from the scan's first live.estimate_frames frames (the first batch holds exactly those).
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import zmq

from counting.errors import PermanentError
from counting.geometry import ALL_SECTORS
from counting.live_images import MAX_POSITIONS
from counting.sparse import FORMAT_VERSION, SparseFormatError
from counting.storage.attrs import load_tree
from streaming.live.publisher import LivePublisher
from streaming.protocol import control as p
from streaming.settings import LiveSettings

BATCH_SLOTS = 256  # frame slots per batch (as fast as it goes; paced, about 0.1 s of frames)
QUEUE_BATCHES = 4  # batches waiting for the publisher's thread: the file waits, memory stays flat


@dataclass(frozen=True)
class ReplayBatch:
    """Frames of the file in scan order: positions, sector masks, events in CSR (offsets, indices)."""

    positions: np.ndarray  # int64 (frames,)
    masks: np.ndarray  # uint8 (frames,)
    offsets: np.ndarray  # int64 (frames + 1,)
    indices: np.ndarray  # uint32 (events,): row * 576 + col
    stray_events: int = 0  # events in slots whose mask says no frame arrived (not replayed)


@dataclass
class ReplayProgress:
    """What has been replayed so far, and what the file holds."""

    frames: int = 0
    events: int = 0
    total_frames: int = 0
    started: float = field(default_factory=time.monotonic)
    stray_events: int = 0
    stopped: bool = False  # stopped before the end (Ctrl-C)

    @property
    def rate(self) -> float:
        """Frames per second since the start."""
        elapsed = time.monotonic() - self.started
        return self.frames / elapsed if elapsed > 0 else 0.0


class BatchSink(Protocol):
    """What takes the replayed scan: LivePublisher's begin/batch/end (and any live analysis beside it)."""

    def begin(self, begin: p.ScanBegin) -> None: ...

    def batch(
        self, key: str, positions: np.ndarray, masks: np.ndarray, offsets: np.ndarray, indices: np.ndarray
    ) -> None: ...

    def end(self, key: str) -> None: ...


class ScanSource:
    """A written counted scan, open for replay (checked on opening: a file that is not one raises
    SparseFormatError with a one-line reason); ``close`` when done."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SparseFormatError(f"{self.path}: {'not a file' if self.path.exists() else 'no such file'}")
        try:
            self.path.open("rb").close()
        except OSError as exc:
            raise SparseFormatError(f"{self.path}: cannot be read ({exc.strerror})") from None
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise SparseFormatError(f"{self.path}: {_why_unreadable(exc)}") from None
        try:
            self._open()
        except BaseException:
            self._file.close()
            raise

    def _open(self) -> None:
        f, path = self._file, self.path
        try:
            if "electron_events" not in f:
                raise SparseFormatError(f"{path}: not a counted scan (no /electron_events)")
            version = int(f.attrs.get("version", 1))
            if version != FORMAT_VERSION:
                raise SparseFormatError(f"{path}: sparse format version {version}, not {FORMAT_VERSION}")
            sp, self._frames = f["electron_events/scan_positions"], f["electron_events/frames"]
            self.width, self.height = int(sp.attrs["Nx"]), int(sp.attrs["Ny"])
            slots = self._frames.shape[0]
            positions = self.width * self.height
            if not 0 < positions <= MAX_POSITIONS or slots % positions or slots == 0:
                raise SparseFormatError(
                    f"{path}: {slots} frame slots do not fit a {self.width}x{self.height} scan"
                )
            self.k = slots // positions
            masks = f["electron_events"].get("sector_masks")
            self.masks = (  # stempy's own files carry none: every slot taken as a complete frame
                np.full(slots, ALL_SECTORS, np.uint8) if masks is None else masks[()].astype(np.uint8).ravel()
            )
            if len(self.masks) != slots:
                raise SparseFormatError(f"{path}: {len(self.masks)} sector masks for {slots} frame slots")
            meta = load_tree(f["metadata"]) if "metadata" in f else {}
        except KeyError as exc:
            raise SparseFormatError(f"{path}: missing {exc} (not a stempy-format counted scan)") from None
        except OSError as exc:
            raise SparseFormatError(f"{path}: {_why_unreadable(exc)}") from None
        number = meta.get("stemstream", {}).get("scan_number", 0)
        self.scan_number = number if isinstance(number, int) and 0 <= number <= 0xFFFFFFFF else 0
        self.calibration = dict(meta.get("microscope", {}))  # step_x/y_angstrom, energy_ev, ... when present

    @property
    def frames(self) -> int:
        """Frames the file holds (slots with at least one sector)."""
        return int(np.count_nonzero(self.masks))

    def report(self) -> dict[str, int]:
        """What is missing in the file: positions without any frame, incomplete frames, sectors lost."""
        per_position = self.masks.reshape(-1, self.k)
        bits = int(np.unpackbits(self.masks[:, None], axis=1).sum())
        return {
            "positions": self.width * self.height,
            "frames": self.frames,
            "positions_without_frame": int(np.count_nonzero(~per_position.any(axis=1))),
            "incomplete_frames": int(np.count_nonzero((self.masks != 0) & (self.masks != ALL_SECTORS))),
            "sectors_lost": 4 * len(self.masks) - bits,
        }

    def begin(self, key: str) -> p.ScanBegin:
        """The scan's begin, as one node of one would see it (expected: every slot a frame)."""
        return p.ScanBegin(self.scan_number, self.width, self.height, len(self.masks), 0, 1, scan_key=key)

    def batches(self, size: int = BATCH_SLOTS, first: int | None = None) -> Iterator[ReplayBatch]:
        """The frames in scan order, ``size`` slots a batch (the first: the slots of the first ``first``
        frames); an unreadable part of the file raises SparseFormatError naming the slot."""
        start, total = 0, len(self.masks)
        head = int(np.searchsorted(np.cumsum(self.masks != 0), first)) + 1 if first else size
        while start < total:
            stop = min(start + (head if start == 0 else size), total)
            try:
                events = self._frames[start:stop]
            except OSError as exc:
                raise SparseFormatError(f"{self.path}: unreadable at frame slot {start}: {exc}") from None
            yield _batch(events, self.masks[start:stop], start, self.k)
            start = stop

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _batch(events: np.ndarray, masks: np.ndarray, start: int, k: int) -> ReplayBatch:
    """Slots start.. of the file as a batch of the frames they hold (mask 0: none)."""
    sizes = np.fromiter((len(e) for e in events), np.int64, len(events))
    keep = masks != 0
    stray = int(sizes[~keep].sum())
    kept = [np.asarray(events[i], np.uint32) for i in np.flatnonzero(keep)]
    offsets = np.zeros(len(kept) + 1, np.int64)
    np.cumsum(sizes[keep], out=offsets[1:])
    indices = np.concatenate(kept) if kept else np.empty(0, np.uint32)
    positions = (start + np.flatnonzero(keep)) // k
    return ReplayBatch(positions.astype(np.int64), masks[keep], offsets, indices, stray)


def _why_unreadable(exc: OSError) -> str:
    """h5py's reason, in a user's words (truncated files say so)."""
    text = str(exc)
    sizes = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", text)
    if sizes:
        return f"truncated file ({sizes[1]} of {sizes[2]} bytes)"
    if "signature" in text or "not an hdf5" in text.lower():
        return "not an HDF5 file"
    return f"not a readable HDF5 file ({text})"


def feed(sinks: Sequence[BatchSink], key: str, batch: ReplayBatch) -> None:
    """One batch of the file to every live analysis (the live images' publisher; phase analyses plug in
    here with the same arguments)."""
    for sink in sinks:
        sink.batch(key, batch.positions, batch.masks, batch.offsets, batch.indices)


def replay(
    source: ScanSource,
    sinks: Sequence[BatchSink],
    key: str,
    rate: float = 0.0,
    stop: threading.Event | None = None,
    progress: Callable[[ReplayProgress], None] | None = None,
    first: int = 64,
) -> ReplayProgress:
    """Feed the file's frames to ``sinks`` in scan order at ``rate`` frames/s (0: as fast as they take
    them), calling ``progress`` about once a second and at the end; ``stop`` ends it early."""
    stop = stop or threading.Event()
    done = ReplayProgress(total_frames=source.frames)
    size = max(1, min(BATCH_SLOTS, round(rate * 0.1))) if rate else BATCH_SLOTS
    for sink in sinks:
        sink.begin(source.begin(key))
    shown = time.monotonic()
    for batch in source.batches(size, first=first):
        if stop.is_set():
            done.stopped = True
            break
        feed(sinks, key, batch)
        done.frames += len(batch.positions)
        done.events += len(batch.indices)
        done.stray_events += batch.stray_events
        if rate and stop.wait(max(0.0, done.started + done.frames / rate - time.monotonic())):
            done.stopped = True
            break
        if progress is not None and time.monotonic() - shown >= 1.0:
            progress(done)
            shown = time.monotonic()
    for sink in sinks:
        sink.end(key)
    if progress is not None:
        progress(done)
    return done


def replay_key(source: ScanSource) -> str:
    """A scan key of the replay's own (the view lists each replay as a scan of its own)."""
    return f"replay-{source.scan_number}-{uuid.uuid4().hex[:12]}"


class ReplayError(PermanentError, RuntimeError):
    """The replay could not hand the file to the live images."""


class ReplayPublisher(LivePublisher):
    """The nodes' LivePublisher whose batches wait for room in its (short) queue: a file can wait, a
    camera cannot, and nothing of the file may be dropped."""

    def _put(self, item: tuple) -> None:
        while self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.2)
                return
        raise ReplayError("replay: the live images' thread stopped (see the log above)")


@contextlib.contextmanager
def publisher(live: LiveSettings, address: str) -> Iterator[ReplayPublisher]:
    """A publisher sending snapshots to the view's intake at ``address`` (its final snapshot is out, or
    given up on, when the block ends)."""
    ctx = zmq.Context()
    settings = live.model_copy(update={"connect": address, "queue_batches": QUEUE_BATCHES, "enabled": True})
    pub = ReplayPublisher(ctx, "replay", settings, address, None)
    try:
        yield pub
    finally:
        pub.close(timeout=10.0)
        ctx.destroy(linger=0)
