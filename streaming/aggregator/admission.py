"""Which scan a sector of another scan than the open one belongs to: a new scan (begun now, or held until
every node is armed), one refused (it began before the session was first ready), or a scan that just
ended (late); and the counting of late, refused and malformed messages."""

from __future__ import annotations

import logging
import time

from streaming.aggregator.data_path import EndedScans
from streaming.aggregator.open_scan import OpenScan
from streaming.aggregator.registry import NodeRegistry
from streaming.aggregator.stats import AggregatorStats
from streaming.protocol.reasons import Verdict
from streaming.protocol.sector import SectorHeader, WireError

log = logging.getLogger(__name__)


class Admission:
    """Decides what a sector of another scan starts; holds the first sector of a scan waiting for the arm.

    nodes: who is connected and armed; ended: the data path's memory of ended scans; stats: the counters
    it adds to; window: scan_deadline (how long an ended or refused scan's number stays taken).
    """

    def __init__(self, nodes: NodeRegistry, ended: EndedScans, stats: AggregatorStats, window: float) -> None:
        self.nodes, self.ended, self.stats, self.window = nodes, ended, stats, window
        self.held: tuple[SectorHeader, list | None] | None = None  # a new scan's first sector, waiting
        self.armed_once = False  # all nodes have been ready at least once (the session's "ready")
        self._refusing: dict[int, float] = {}  # scan number -> last refused sector (monotonic)

    def armed(self) -> bool:
        """Every node armed: all N before the session's first ready, every connected one after."""
        return self.nodes.all_ready(self.armed_once)

    def check_armed(self) -> bool:
        """armed(), noting the session's first ready."""
        armed = self.nodes.all_ready(self.armed_once)
        self.armed_once = self.armed_once or armed
        return armed

    def decide(self, header: SectorHeader, open_scan: OpenScan | None) -> Verdict:
        """A sector of another scan than ``open_scan`` (seen here, or by a forwarder): HELD (its scan
        already waits for the arm), REFUSED, LATE, or NEW (the caller ends the open scan, then begins the
        new one, or holds it when the nodes are not armed)."""
        number = header.scan_number
        if self.held is not None and self.held[0].scan_number == number:
            return Verdict.HELD  # already waiting for the arm (seen here or by a forwarder)
        if open_scan is None and self._refuse(number):
            return Verdict.REFUSED
        if self.ended.is_late(number, time.monotonic()):
            return Verdict.LATE
        return Verdict.NEW

    def hold(self, header: SectorHeader, parts: list | None) -> None:
        """Keep a new scan's first sector until every node is armed (parts None: a forwarder holds it)."""
        self.held = (header, parts)

    def take_held(self) -> tuple[SectorHeader, list | None] | None:
        """The held sector, once every node is armed (then it is no longer held)."""
        if self.held is None or not self.armed():
            return None
        held, self.held = self.held, None
        return held

    def count_late(self, number: int) -> None:
        """A sector of a scan that just ended, dropped."""
        self.stats.late += 1
        if self.stats.late & (self.stats.late - 1) == 0:  # powers of two: never a log flood
            log.warning(
                "late sector #%d dropped: scan %d ended less than %g s ago",
                self.stats.late,
                number,
                self.window,
            )

    def count_refused(self, number: int) -> None:
        """A sector of a refused scan, dropped."""
        self.stats.refused += 1
        self.stats.refused_scans[number] = self.stats.refused_scans.get(number, 0) + 1

    def count_malformed(self, exc: WireError, open_scan: OpenScan | None) -> None:
        """A message that failed validation, dropped."""
        self.stats.malformed += 1
        if open_scan is not None:
            open_scan.malformed += 1
        # One line per power of two, so a flood of garbage cannot flood the log.
        if self.stats.malformed & (self.stats.malformed - 1) == 0:
            log.warning("malformed sector message #%d dropped: %s", self.stats.malformed, exc)

    def _refuse(self, number: int) -> bool:
        """Refuse (count, never forward) a scan that began before the session was first armed, and the
        rest of it: a scan that cannot be counted whole is reported, not written in part."""
        now = time.monotonic()
        last = self._refusing.get(number)
        if self.armed_once and (last is None or now - last >= self.window):
            self._refusing.pop(number, None)
            return False
        if last is None:
            log.warning(
                "scan %d arrived before every node was ready: refused (its sectors are dropped and counted; "
                "nothing of it is written); the first scan after ready is counted whole",
                number,
            )
        self._refusing[number] = now
        return True
