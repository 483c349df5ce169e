"""Which scan a sector of another scan than the open one belongs to: a new scan (begun now, or held until
every node is armed), one refused (it began before the session was first ready), or a scan that just
ended (late); and the counting of malformed messages. A part of Aggregator, kept apart so each file reads
in one sitting; it uses the aggregator's registry, counters and scan state."""

from __future__ import annotations

import logging
import time

from streaming.protocol.sector import SectorHeader, WireError

log = logging.getLogger(__name__)


class ScanAdmission:
    """Aggregator methods deciding what a sector of another scan starts (mixed into Aggregator)."""

    def _admit(self, header: SectorHeader, parts: list | None) -> str:
        """A sector of another scan than the open one (seen here, or by a forwarder: parts None): "begun"
        (a new scan began with it), "held" (it begins when the nodes are armed), "refused" or "late"."""
        number = header.scan_number
        if self._held is not None and self._held[0].scan_number == number:
            return "held"  # already waiting for the arm (seen here or by a forwarder)
        if self._scan is None and self._refuse(number):
            return "refused"
        if self._is_late(number):
            return "late"
        if self._scan is not None:
            self._end_scan("superseded")
        if not self.nodes.all_ready(self._armed_once):
            self._held = (header, parts)  # begins when every node is armed again
            return "held"
        self._begin_scan(header)
        return "begun"

    def _count_late(self, number: int) -> None:
        self.stats.late += 1
        if self.stats.late & (self.stats.late - 1) == 0:  # powers of two: never a log flood
            log.warning(
                "late sector #%d dropped: scan %d ended less than %g s ago",
                self.stats.late,
                number,
                self.scan_deadline,
            )

    def _count_refused(self, number: int) -> None:
        self.stats.refused += 1
        self.stats.refused_scans[number] = self.stats.refused_scans.get(number, 0) + 1

    def _refuse(self, number: int) -> bool:
        """Refuse (count, never forward) a scan that began before the session was first armed, and the
        rest of it: a scan that cannot be counted whole is reported, not written in part."""
        now = time.monotonic()
        last = self._refusing.get(number)
        if self._armed_once and (last is None or now - last >= self.scan_deadline):
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

    def _is_late(self, number: int) -> bool:
        """A sector of a scan that ended less than scan_deadline ago is late; after that the same number
        begins a new scan (the detector resets its scan numbers)."""
        ended = self._ended.get(number)
        if ended is None:
            return False
        if time.monotonic() - ended < self.scan_deadline:
            return True
        del self._ended[number]
        return False

    def _on_malformed(self, exc: WireError) -> None:
        self.stats.malformed += 1
        if self._scan is not None:
            self._scan.malformed += 1
        # One line per power of two, so a flood of garbage cannot flood the log.
        if self.stats.malformed & (self.stats.malformed - 1) == 0:
            log.warning("malformed sector message #%d dropped: %s", self.stats.malformed, exc)
