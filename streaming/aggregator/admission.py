"""Which scan a sector of another scan than the open one belongs to: a new scan (begun now, or held until
every node is armed), one refused (it began before the session was first ready, or announces more than
streaming.max_scan_positions), a scan that just ended (late), or a candidate to supersede the open scan;
and the counting of late, refused and malformed messages.

Supersede rule (the README's): while a scan is open, a sector of another scan number ends it only once
SUPERSEDE_SECTORS (4, a frame's worth) sectors of that number have come, or at once when the open scan has
had no sector for a quarter of scan_deadline; until then they are kept (at most 3 sectors) and forwarded
when their scan begins. So one stray message never truncates the open scan."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from streaming.aggregator.data_path import EndedScans
from streaming.aggregator.open_scan import OpenScan
from streaming.aggregator.registry import NodeRegistry
from streaming.aggregator.stats import AggregatorStats
from streaming.protocol.reasons import Verdict
from streaming.protocol.sector import SectorHeader, WireError
from streaming.transport.ratelog import RateLimitedLog

log = logging.getLogger(__name__)
_ratelog = RateLimitedLog(log)
MAX_POSITIONS = 4096 * 4096  # streaming.max_scan_positions' default
REFUSED_SCANS_KEPT = 1024  # scan numbers counted one by one in refused_scans (beyond: only in refused)
SUPERSEDE_SECTORS = 4  # sectors of another scan number that end the open scan (a frame's worth)


@dataclass
class _Candidate:
    """Sectors of another scan number that came while a scan was open (parts None: a forwarder's)."""

    number: int
    sectors: list[tuple[SectorHeader, list | None]] = field(default_factory=list)


class Admission:
    """Decides what a sector of another scan starts; holds the first sector of a scan waiting for the arm.

    nodes: who is connected and armed; ended: the data path's memory of ended scans; stats: the counters
    it adds to; window: scan_deadline (how long an ended or refused scan's number stays taken);
    max_positions: streaming.max_scan_positions (a scan announcing more positions is refused).
    """

    def __init__(
        self,
        nodes: NodeRegistry,
        ended: EndedScans,
        stats: AggregatorStats,
        window: float,
        max_positions: int = MAX_POSITIONS,
    ) -> None:
        self.nodes, self.ended, self.stats, self.window = nodes, ended, stats, window
        self.max_positions = max_positions
        self.held: tuple[SectorHeader, list | None] | None = None  # a new scan's first sector, waiting
        self.armed_once = False  # all nodes have been ready at least once (the session's "ready")
        self._refusing: dict[int, float] = {}  # scan number -> last refused sector (monotonic)
        self._candidate: _Candidate | None = None  # a scan number that may supersede the open scan

    def armed(self) -> bool:
        """Every node armed: all N before the session's first ready, every connected one after."""
        return self.nodes.all_ready(self.armed_once)

    def check_armed(self) -> bool:
        """armed(), noting the session's first ready."""
        armed = self.nodes.all_ready(self.armed_once)
        if armed and not self.armed_once:
            # the line a person streaming by hand waits for: scans sent before it are refused
            log.info("ready: all %d node(s) armed; scans sent from now on are written", self.nodes.n_nodes)
        self.armed_once = self.armed_once or armed
        return armed

    def decide(self, header: SectorHeader, open_scan: OpenScan | None, parts: list | None = None) -> Verdict:
        """A sector of another scan than ``open_scan`` (seen here with its ``parts``, or by a forwarder):
        HELD (its scan already waits for the arm, or it is kept as a candidate to supersede the open
        scan), REFUSED, LATE, or NEW (the caller ends the open scan, then begins the new one, or holds it
        when the nodes are not armed)."""
        number = header.scan_number
        if self.oversize(header):
            return Verdict.REFUSED  # before anything is held, begun or allocated for it
        if self.held is not None and self.held[0].scan_number == number:
            return Verdict.HELD  # already waiting for the arm (seen here or by a forwarder)
        if open_scan is None and self._refuse(number):
            return Verdict.REFUSED
        now = time.monotonic()
        if self.ended.is_late(number, now):
            return Verdict.LATE
        if open_scan is not None and not self._supersedes(header, parts, open_scan, now):
            return Verdict.HELD  # kept: forwarded if its scan begins
        return Verdict.NEW

    def _supersedes(self, header: SectorHeader, parts: list | None, open_scan: OpenScan, now: float) -> bool:
        """Keep a sector of another scan number; True when that number now supersedes the open scan (the
        module docstring's rule); its kept sectors then wait in take_replay."""
        c = self._candidate
        if c is None or c.number != header.scan_number:
            if c is not None:  # another number came meanwhile: the old candidate's sectors are dropped
                for h, kept in c.sectors:
                    if kept is not None:
                        self.count_refused(h.scan_number)
            c = self._candidate = _Candidate(header.scan_number)
        quiet = now - open_scan.last_sector >= self.window / 4
        if quiet or len(c.sectors) + 1 >= SUPERSEDE_SECTORS:
            return True
        c.sectors.append((header, parts))
        return False

    def take_replay(self, open_scan: OpenScan | None) -> list[list]:
        """The kept sectors (their parts) of the scan that superseded the open one, once it is open, to be
        taken again in order; a forwarder's are left to the forwarder, which holds them itself."""
        c = self._candidate
        if c is None or open_scan is None or open_scan.number != c.number:
            return []
        self._candidate = None
        return [kept for _, kept in c.sectors if kept is not None]

    def oversize(self, header: SectorHeader) -> bool:
        """The scan's announced shape is above streaming.max_scan_positions (logged at a bounded rate)."""
        positions = header.scan_width * header.scan_height
        if positions <= self.max_positions:
            return False
        _ratelog(
            "refused oversize scan",
            "scan %d announces %dx%d = %d positions, above streaming.max_scan_positions=%d: refused (its "
            "sectors are dropped and counted, nothing is allocated for it)",
            header.scan_number,
            header.scan_width,
            header.scan_height,
            positions,
            self.max_positions,
        )
        return True

    def hold(self, header: SectorHeader, parts: list | None) -> None:
        """Keep a new scan's first sector until every node is armed (parts None: a forwarder holds it)."""
        self.held = (header, parts)

    def take_held(self) -> tuple[SectorHeader, list | None] | None:
        """The held sector, once every node is armed (then it is no longer held). Asked only while no scan
        is open: a candidate kept while one was (it ended meanwhile) is then the first in line."""
        c = self._candidate
        if self.held is None and c is not None and c.sectors:
            self.held = c.sectors.pop(0)
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
        refused = self.stats.refused_scans
        if number in refused or len(refused) < REFUSED_SCANS_KEPT:  # bounded: numbers come from the wire
            refused[number] = refused.get(number, 0) + 1

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
