"""One scan as a node streamer sees it: what arrived and was counted, and the frames waiting for the
scan's thresholds (they come from the scan writer, estimated from the first complete frames all nodes
offer, or fixed)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from counting.geometry import ALL_SECTORS
from counting.kernel import Thresholds
from streaming.node.assembly import Sealed, Slot
from streaming.node.writer_client import WriterClient
from streaming.protocol import control as p
from streaming.protocol.reasons import EndReason

log = logging.getLogger("streaming.node.streamer")  # its lines are logged as the node streamer's


def check_shape(begin: p.ScanBegin, max_positions: int) -> None:
    """Refuse (ProtocolError) a scan above streaming.max_scan_positions before anything is allocated for it."""
    if begin.scan_width * begin.scan_height > max_positions:
        raise p.ProtocolError(
            f"scan {begin.scan_number} of {begin.scan_width}x{begin.scan_height} positions is above "
            f"streaming.max_scan_positions={max_positions}: refused"
        )


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
    end: p.ScanEnd | None = None  # every path's end, combined
    ends: dict[int, p.ScanEnd] = field(default_factory=dict)  # by path: 0 the aggregator, i forwarder i
    first_end_at: float = 0.0  # monotonic time of the aggregator's end
    end_reason: str = ""
    sectors: int = 0
    frames: int = 0
    incomplete: int = 0
    counting_seconds: float = 0.0
    late: int = 0
    evicted: int = 0
    lost: set[str] = field(default_factory=set)  # nodes the aggregator lost while this scan streamed

    @property
    def number(self) -> int:
        """The scan number."""
        return self.begin.scan_number

    @property
    def finished(self) -> bool:
        """Ended, and nothing left to count or to wait for."""
        return self.end is not None and not self.pending and not self.outstanding

    def add_end(self, end: p.ScanEnd) -> bool:
        """Record one path's end; True when every path's end is in (the aggregator's names the others)."""
        self.ends[end.path] = end
        if end.path == 0:
            self.first_end_at = time.monotonic()
        return not self.missing_paths() and 0 in self.ends

    def missing_paths(self) -> list[int]:
        """Forwarders the aggregator's end names whose end has not come."""
        main = self.ends.get(0)
        return [] if main is None else [i for i in main.forwarders if i not in self.ends]

    def waiting_for_paths(self, now: float, deadline: float) -> bool:
        """The aggregator's end came more than ``deadline`` ago and a forwarder's is still missing."""
        return 0 in self.ends and now - self.first_end_at > deadline and bool(self.missing_paths())

    def overdue(self, now: float, last_heard: float, deadline: float, name: str) -> EndReason | None:
        """Why this scan must end now though not every end is in (None while it need not): a forwarder's
        end missing ``deadline`` after the aggregator's (the end is then combined from those that came),
        or the aggregator silent for ``deadline``."""
        if self.end is not None:
            return None
        if self.waiting_for_paths(now, deadline):
            log.warning(
                "%s: scan %d: forwarding process(es) %s sent no end within %.1f s of the aggregator's; "
                "ending the scan",
                name,
                self.number,
                self.missing_paths(),
                deadline,
            )
            self.end = self.combined_end()
            return EndReason.FORWARDER_LOST
        if now - last_heard > deadline:
            log.warning(
                "%s: scan %d: aggregator silent for %.1f s, ending the scan", name, self.number, deadline
            )
            return EndReason.NODE_DEADLINE
        return None

    def take_thresholds(self, t: p.ScanThresholds, name: str) -> list[Sealed]:
        """The writer's thresholds for this scan; returns the batches that waited for them, to count now, or
        (when none could be had: ``failed``) to release uncounted."""
        if np.isfinite(t.background) and np.isfinite(t.xray):
            self.thresholds = Thresholds(t.background, t.xray)
            self.samples_closed = True
        else:
            log.error(
                "%s: scan %d has no thresholds (%s); its frames are not counted",
                name,
                t.scan_number,
                t.metadata.get("error"),
            )
            self.failed = True
        pending, self.pending = self.pending, []
        return pending

    def combined_end(self) -> p.ScanEnd:
        """The aggregator's end with the sectors every path sent this node."""
        main = self.ends[0]
        return replace(main, sectors_sent=sum(e.sectors_sent for e in self.ends.values()))

    def offer_samples(self, writer: WriterClient, slot: Slot, sealed: Sealed, wanted: int) -> None:
        """Offer this batch's complete frames (up to ``wanted`` in all) for threshold estimation."""
        need = wanted - self.samples_sent
        if self.samples_closed or need <= 0:
            return
        rows = np.flatnonzero(slot.masks[: sealed.frames] == ALL_SECTORS)[:need]
        numbers = [int(n) for n in slot.frame_numbers[rows]]
        self.samples_sent += len(rows)
        last = self.samples_sent >= wanted
        header = p.SampleHeader(
            name=writer.name,
            scan_number=self.number,
            frame_numbers=numbers,
            last=last,
            scan_key=self.begin.scan_key,
        )
        writer.send(header, *[slot.frames[r].tobytes() for r in rows])
        self.samples_closed = last

    def take_lost(self, lost: p.NodesLost, writer: WriterClient) -> bool:
        """Nodes the aggregator lost while this scan streams (False: the message is about another scan).
        The writer hears of new ones at once, while it may still wait for their threshold samples."""
        if lost.scan_key != self.begin.scan_key or lost.scan_number != self.number:
            return False
        new = sorted(set(lost.lost) - self.lost)
        self.lost.update(new)
        if new:
            log.warning("%s: scan %d: node(s) %s lost; the writer no longer waits for them",
                        writer.name, self.number, ", ".join(new))  # fmt: skip
        if new and self.thresholds is None and not self.failed:
            writer.send(self._no_samples(writer.name, last=False, lost=new))
        return True

    def close_samples(self, writer: WriterClient, lost: list[str]) -> None:
        """No more samples will come from this node (the scan ended before it had enough); nodes the
        aggregator lost will close nothing, so the writer estimates without them."""
        if (not self.samples_closed or lost) and self.thresholds is None:
            writer.send(self._no_samples(writer.name, last=True, lost=lost))
            self.samples_closed = True

    def _no_samples(self, name: str, last: bool, lost: list[str]) -> p.SampleHeader:
        """A sample header with no frames: it names lost nodes, and closes this node's offer when last."""
        return p.SampleHeader(name, self.number, [], last, self.begin.scan_key, lost)

    def done_messages(self, name: str, duplicates: int) -> tuple[p.NodeScanDone, p.Done]:
        """What the writer and the aggregator are told when this node has finished the scan (and its
        log line)."""
        reason = self.end_reason or self.end.reason
        log.info(
            "%s: scan %d done: %d sectors, %d frames (%d incomplete), %s",
            name,
            self.number,
            self.sectors,
            self.frames,
            self.incomplete,
            reason,
        )
        to_writer = p.NodeScanDone(
            name=name,
            scan_number=self.number,
            sectors=self.sectors,
            sectors_sent=self.end.sectors_sent,
            frames=self.frames,
            incomplete_frames=self.incomplete,
            duplicates=duplicates,
            reason=reason,
            counting_seconds=self.counting_seconds,
            late_sectors=self.late,
            evicted_slots=self.evicted,
            scan_key=self.begin.scan_key,
            lost=sorted(self.lost.union(self.end.lost)),
        )
        to_aggregator = p.Done(
            name=name,
            scan_number=self.number,
            sectors=self.sectors,
            frames=self.frames,
            incomplete_frames=self.incomplete,
            reason=reason,
        )
        return to_writer, to_aggregator
