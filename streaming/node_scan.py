"""One scan as a node streamer sees it: what arrived and was counted, and the frames waiting for the
scan's thresholds (they come from the scan writer, estimated from the first complete frames all nodes
offer, or fixed)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from counting.geometry import ALL_SECTORS
from counting.kernel import Thresholds
from streaming import protocol as p
from streaming.assembly import Sealed, Slot
from streaming.writer_client import WriterClient


@dataclass
class NodeScan:
    """Per-scan state and counters of a node."""

    begin: p.ScanBegin
    thresholds: Thresholds | None = None
    failed: bool = False  # no thresholds could be had: frames are released uncounted
    pending: list[Sealed] = field(default_factory=list)  # sealed, waiting for thresholds
    outstanding: int = 0  # slots being counted
    samples_sent: int = 0
    samples_closed: bool = False
    end: p.ScanEnd | None = None
    end_reason: str = ""
    sectors: int = 0
    frames: int = 0
    incomplete: int = 0
    counting_seconds: float = 0.0
    late: int = 0
    evicted: int = 0

    @property
    def number(self) -> int:
        """The scan number."""
        return self.begin.scan_number

    @property
    def finished(self) -> bool:
        """Ended, and nothing left to count or to wait for."""
        return self.end is not None and not self.pending and not self.outstanding

    def offer_samples(self, writer: WriterClient, slot: Slot, sealed: Sealed, wanted: int) -> None:
        """Offer this batch's complete frames (up to ``wanted`` in all) for threshold estimation."""
        need = wanted - self.samples_sent
        if self.samples_closed or need <= 0:
            return
        rows = np.flatnonzero(slot.masks[: sealed.frames] == ALL_SECTORS)[:need]
        numbers = [int(n) for n in slot.frame_numbers[rows]]
        self.samples_sent += len(rows)
        last = self.samples_sent >= wanted
        header = p.SampleHeader(writer.name, self.number, numbers, last, self.begin.scan_key)
        writer.send(header, *[slot.frames[r].tobytes() for r in rows])
        self.samples_closed = last

    def close_samples(self, writer: WriterClient) -> None:
        """No more samples will come from this node (the scan ended before it had enough)."""
        if not self.samples_closed and self.thresholds is None:
            writer.send(p.SampleHeader(writer.name, self.number, [], True, self.begin.scan_key))
            self.samples_closed = True

    def done_messages(self, name: str, duplicates: int) -> tuple[p.NodeScanDone, p.Done]:
        """What the writer and the aggregator are told when this node has finished the scan."""
        reason = self.end_reason or self.end.reason
        return (
            p.NodeScanDone(
                name,
                self.number,
                self.sectors,
                self.end.sectors_sent,
                self.frames,
                self.incomplete,
                duplicates,
                reason,
                self.counting_seconds,
                self.late,
                self.evicted,
                self.begin.scan_key,
            ),
            p.Done(name, self.number, self.sectors, self.frames, self.incomplete, reason),
        )
