"""Reassembling frames from sectors, straight into fixed batch slots, with a bounded number in flight.

Sectors are copied once, from the received message into their place in a batch slot (a (batch, 576, 576)
uint16 array, in shared memory when counting runs in worker processes). A frame gets a row in the open
slot when its first sector arrives; a slot is sealed, and handed to counting, when all its rows are
complete. At the end of a scan every partly filled slot is sealed too, with missing sectors zero and
their bits clear in the mask. When no slot is free the assembler refuses new frames, and the caller stops
reading from the network (back-pressure) until counting frees one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from counting.geometry import ALL_SECTORS, FRAME_COLS, N_SECTORS, SECTOR_BYTES, SECTOR_ROWS, FrameBatch

SECTOR_PIXELS = SECTOR_ROWS * FRAME_COLS


@dataclass
class Slot:
    """One batch of frames being filled."""

    index: int
    frames: np.ndarray  # (batch, 576, 576) uint16 view into the slot's memory
    flat: np.ndarray = field(init=False)  # the same, (batch, 576 * 576): sector m is one contiguous run
    frame_numbers: np.ndarray = field(init=False)
    positions: np.ndarray = field(init=False)
    masks: np.ndarray = field(init=False)
    used: int = 0  # rows assigned
    complete: int = 0  # rows with all sectors
    scan_number: int = -1
    opened: float = 0.0  # monotonic time the first row was assigned

    def __post_init__(self) -> None:
        n = self.frames.shape[0]
        self.flat = self.frames.view()
        self.flat.shape = (n, -1)  # raises rather than copy: writes must land in the slot's memory
        self.frame_numbers = np.zeros(n, np.int64)
        self.positions = np.zeros(n, np.int64)
        self.masks = np.zeros(n, np.uint8)

    def reset(self, scan_number: int) -> None:
        """Make the slot empty for a new batch."""
        self.used = self.complete = 0
        self.scan_number = scan_number
        self.opened = time.monotonic()

    def batch(self) -> FrameBatch:
        """The filled rows as a FrameBatch (views, no copy)."""
        n = self.used
        return FrameBatch(self.frames[:n], self.frame_numbers[:n], self.positions[:n], self.masks[:n])


def _sector_views(slot: Slot) -> list[memoryview]:
    flat = slot.flat.view()
    flat.shape = (-1,)  # raises rather than copy: the views must be of the slot's memory
    flat = memoryview(flat.view(np.uint8))
    n = slot.frames.shape[0] * N_SECTORS
    return [flat[i * SECTOR_BYTES : (i + 1) * SECTOR_BYTES] for i in range(n)]


@dataclass(frozen=True)
class Sealed:
    """A slot ready to count: which slot, which scan, how many frames."""

    slot: int
    scan_number: int
    frames: int
    incomplete: int


@dataclass(frozen=True)
class AssemblyCounts:
    """What the assembler dropped or sealed early since it was last asked (one scan's worth)."""

    duplicates: int  # repeated sectors, dropped
    late: int  # sectors of frames already sealed (after an eviction), dropped
    evicted: int  # slots sealed early because frames waited too long for their sectors


class FrameAssembler:
    """Places sectors of one scan at a time into slots; yields sealed slots for counting."""

    def __init__(self, slots: list[np.ndarray]):
        if not slots:
            raise ValueError("at least one slot is needed")
        self._slots = [Slot(i, s) for i, s in enumerate(slots)]
        # Each sector's bytes as a memoryview, [slot][row * N_SECTORS + module], made once: a sector is
        # received straight into its place (streaming.node.intake), with no array made per sector.
        self._sectors = [_sector_views(s) for s in self._slots]
        self._free = list(range(len(slots)))[::-1]
        self._open: Slot | None = None
        self._where: dict[int, list[int]] = {}  # frame_number -> [slot, row, sectors arrived (mask)]
        self.scan_number = -1
        self.duplicates = 0
        self.late = 0  # sectors of frames already sealed (after an eviction): dropped and counted
        self.evicted = 0  # slots sealed early because frames waited too long for their sectors
        self._sealed_frames: set[int] = set()  # frame numbers of this scan already handed to counting

    def take_counters(self) -> AssemblyCounts:
        """The counts since the last call, which starts them again from zero (called as a scan closes)."""
        counts = AssemblyCounts(self.duplicates, self.late, self.evicted)
        self.duplicates = self.late = self.evicted = 0
        return counts

    def slot(self, index: int) -> Slot:
        """A slot by index (for the counting side)."""
        return self._slots[index]

    def can_accept(self) -> bool:
        """False when a new frame would need a slot and none is free: stop reading until one is."""
        return self._open is not None and self._open.used < self._open.frames.shape[0] or bool(self._free)

    def has_room_for(self, frame_number: int) -> bool:
        """True if a sector of this frame can be taken now (its frame is in flight, or a row is free)."""
        return frame_number in self._where or frame_number in self._sealed_frames or self.can_accept()

    def begin_scan(self, scan_number: int) -> list[Sealed]:
        """Start a scan; anything left of the previous one is sealed first."""
        sealed = self.flush() if self.scan_number != scan_number else []
        self.scan_number = scan_number
        self._sealed_frames = set()
        return sealed

    def add(self, frame_number: int, position: int, module: int, payload: memoryview) -> list[Sealed]:
        """Copy one sector into its frame; returns slots that became complete. Raises if no slot is free."""
        target = self.destination(frame_number, module)
        if target is not None:
            target[:] = payload
        return self.placed(frame_number, position, module)

    def destination(self, frame_number: int, module: int) -> memoryview | None:
        """Where this sector's bytes go (None: it would be dropped, a duplicate or late), assigning nothing:
        the caller receives the sector there, then calls ``placed``. Bytes written to a sector not yet
        placed are harmless: its row is unassigned, or the sector is missing and zeroed when sealed."""
        entry = self._where.get(frame_number)
        if entry is None:
            if frame_number in self._sealed_frames:
                return None
            slot = self._open
            if slot is None or slot.used == slot.frames.shape[0]:
                if not self._free:
                    raise BufferError("no free slot: stop reading until counting frees one")
                return self._sectors[self._free[-1]][module]  # row 0 of the slot _new_row will take
            return self._sectors[slot.index][slot.used * N_SECTORS + module]
        if entry[2] >> module & 1:
            return None
        return self._sectors[entry[0]][entry[1] * N_SECTORS + module]

    def placed(self, frame_number: int, position: int, module: int) -> list[Sealed]:
        """A sector's bytes are in place at ``destination``: mark it; returns slots that became complete."""
        # Per sector, so plain ints: the frame's mask lives in its entry until the frame is complete.
        entry = self._where.get(frame_number)
        if entry is None:
            if frame_number in self._sealed_frames:
                self.late += 1
                return []
            entry = self._new_row(frame_number, position)
        bit = 1 << module
        mask = entry[2]
        if mask & bit:
            self.duplicates += 1  # a repeated sector would overwrite good data: drop and count it
            return []
        mask |= bit
        if mask != ALL_SECTORS:
            entry[2] = mask
            return []
        slot = self._slots[entry[0]]
        slot.masks[entry[1]] = mask
        slot.complete += 1
        del self._where[frame_number]
        if slot.complete == slot.frames.shape[0]:
            return [self._seal(slot)]
        return []

    def _new_row(self, frame_number: int, position: int) -> list[int]:
        slot = self._open
        if slot is None or slot.used == slot.frames.shape[0]:
            if not self._free:
                raise BufferError("no free slot: stop reading until counting frees one")
            slot = self._slots[self._free.pop()]
            slot.reset(self.scan_number)
            self._open = slot
        row = slot.used
        slot.used += 1
        slot.frame_numbers[row] = frame_number
        slot.positions[row] = position
        slot.masks[row] = 0
        entry = self._where[frame_number] = [slot.index, row, 0]
        return entry

    def _store_masks(self, index: int) -> None:
        """Write the masks of a slot's frames still waiting for sectors into the slot, before sealing."""
        for number in [n for n, (s, _, _) in self._where.items() if s == index]:
            _, row, mask = self._where.pop(number)
            self._slots[index].masks[row] = mask

    def _seal(self, slot: Slot) -> Sealed:
        if slot is self._open:
            self._open = None
        self._sealed_frames.update(slot.frame_numbers[: slot.used].tolist())
        # Missing sectors must read as zero, never as an older frame's data left in the slot.
        for row in np.flatnonzero(slot.masks[: slot.used] != ALL_SECTORS):
            for module in range(N_SECTORS):
                if not slot.masks[row] & (1 << module):
                    slot.frames[row, module * SECTOR_ROWS : (module + 1) * SECTOR_ROWS] = 0
        return Sealed(slot.index, slot.scan_number, slot.used, slot.used - slot.complete)

    def flush(self) -> list[Sealed]:
        """End of scan: seal every slot holding frames, complete or not."""
        pending = {s for s, _, _ in self._where.values()}
        if self._open is not None:
            pending.add(self._open.index)
        for index in pending:
            self._store_masks(index)
        self._open = None
        return [self._seal(self._slots[i]) for i in sorted(pending) if self._slots[i].used]

    def oldest_waiting(self) -> float | None:
        """Monotonic open time of the oldest slot still waiting for sectors, or None."""
        waiting = {s for s, _, _ in self._where.values()}
        return min((self._slots[i].opened for i in waiting), default=None)

    def evict_oldest(self) -> list[Sealed]:
        """Seal the slot that has waited longest, incomplete frames and all; their late sectors are dropped."""
        waiting = {s for s, _, _ in self._where.values()}
        if not waiting:
            return []
        index = min(waiting, key=lambda i: self._slots[i].opened)
        self._store_masks(index)
        self.evicted += 1
        return [self._seal(self._slots[index])]

    def release(self, index: int) -> None:
        """Counting is done with a slot: it may be reused."""
        self._slots[index].used = 0
        self._free.append(index)
