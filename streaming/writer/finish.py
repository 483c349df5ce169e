"""Finishing a scan: its stop record, built once, and the HDF5 metadata derived from it, then the file.

Runs in the writer's background thread, so the next scan can stream meanwhile.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from counting.scan_file import ScanTally
from streaming.protocol import control as p
from streaming.protocol.reasons import EndReason
from streaming.protocol.record import ScanRecord, ScanStatus
from streaming.writer.files import ScanNaming, write_scan
from streaming.writer.scan import OpenScan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeTotals:
    """What the nodes that finished a scan reported, summed over them."""

    reasons: list[str]  # distinct end reasons, sorted
    incomplete_frames: int
    counting_seconds: float
    late_sectors: int
    evicted_batches: int
    duplicate_sectors: int
    sectors_lost_in_transit: int  # sent by the aggregator but never received

    @classmethod
    def of(cls, done: Iterable[p.NodeScanDone], cut_short: EndReason | None = None) -> NodeTotals:
        """Sum the done reports of a scan's nodes (``cut_short``: the writer ended it before they were in)."""
        reports = list(done)
        reasons = {d.reason for d in reports} | ({cut_short} if cut_short else set())
        return cls(
            reasons=sorted(reasons) or [EndReason.DEADLINE],  # none reported: timed out
            incomplete_frames=sum(d.incomplete_frames for d in reports),
            counting_seconds=sum(d.counting_seconds for d in reports),
            late_sectors=sum(d.late_sectors for d in reports),
            evicted_batches=sum(d.evicted_slots for d in reports),
            duplicate_sectors=sum(d.duplicates for d in reports),
            sectors_lost_in_transit=sum(max(d.sectors_sent - d.sectors, 0) for d in reports),
        )


def stop_record(scan: OpenScan, counted: ScanTally, totals: NodeTotals, last_data: float) -> ScanRecord:
    """The scan's stop record as it stands before its file is stored (write_scan adds path and checksum)."""
    b, t = scan.begin, scan.thresholds
    thresholds = [t.background, t.xray] if t is not None else [float("nan"), float("nan")]
    expected = b.scan_width * b.scan_height * counted.frames_per_position
    failed = t is None or not np.isfinite(thresholds[0])
    if failed:
        status = ScanStatus.FAILED
    elif counted.complete_frames == expected and totals.sectors_lost_in_transit == 0:
        status = ScanStatus.COMPLETE
    else:
        status = ScanStatus.INCOMPLETE
    return ScanRecord(
        scan_number=b.scan_number,
        scan_id=scan.scan_id,
        scan_uuid=uuid.uuid4().hex,  # the scan's unique key everywhere (file, stop record, catalogue)
        status=status,
        path=str(scan.path),
        scan_width=b.scan_width,
        scan_height=b.scan_height,
        expected_frames=expected,
        frames_written=counted.num_frames,
        complete_frames=counted.complete_frames,
        completeness=counted.completeness,
        events=counted.num_events,
        nodes=b.n_nodes,
        nodes_done=len(scan.done),
        reasons=totals.reasons,
        sectors_lost_in_transit=totals.sectors_lost_in_transit,
        thresholds=thresholds,
        error=(t.metadata.get("error") if failed and t is not None else None),
        first_data_time=scan.first_data,
        last_data_time=last_data,
        counting_seconds=totals.counting_seconds,
    )


class ScanFinisher:
    """Finishes scans into their final files and stop records; reports storage failures to ``failed``."""

    def __init__(
        self, naming: ScanNaming, session_id: int, dark_reference: str, failed: Callable[[str], None]
    ) -> None:
        self._naming = naming
        self._session_id = session_id
        self._dark_reference = dark_reference
        self._failed = failed

    def __call__(self, scan: OpenScan, last_data: float, cut_short: EndReason | None = None) -> ScanRecord:
        """Store the scan (an unfinished temporary file goes, even after a bug; a finished one is kept)."""
        try:
            return self._store(scan, last_data, cut_short)
        finally:
            scan.file.settle()

    def _store(self, scan: OpenScan, last_data: float, cut_short: EndReason | None) -> ScanRecord:
        b = scan.begin
        totals = NodeTotals.of(scan.done.values(), cut_short)
        record = stop_record(scan, scan.file.tally(), totals, last_data)
        error = write_scan(
            scan.file,
            self.metadata(scan, record, totals),
            scan.path,
            record,
            lambda: self._naming.path_for(scan.scan_id, b.scan_number, scan.started),
        )
        if error is not None:
            log.error("scan %d: %s", b.scan_number, error)
            self._failed(error)
        if record.status is ScanStatus.FAILED and record.path is None:
            return record
        log.info(
            "scan %d written: %s (%d frames, %.2f %% complete, %s)",
            b.scan_number,
            Path(record.path).name,
            record.frames_written,
            100 * record.completeness,
            record.status,
        )
        return record

    def metadata(self, scan: OpenScan, record: ScanRecord, totals: NodeTotals) -> dict:
        """The HDF5's /metadata: the thresholds' own, and the stop record's facts with the provenance."""
        t = scan.thresholds
        counting = dict(t.metadata) if t is not None else {}
        counting.pop("error", None)
        return {
            "electron_counting": counting,
            "stemstream": {
                **record.hdf5_metadata(),
                "scan_key": scan.begin.scan_key,  # the aggregator's key: the live view finds the file by it
                "session_id": self._session_id,
                "aggregator_session": scan.begin.session_id,
                "frames_counted": scan.frames,
                "incomplete_frames": totals.incomplete_frames,
                "late_sectors": totals.late_sectors,
                "evicted_batches": totals.evicted_batches,
                "dark_reference": self._dark_reference,
                "duplicate_sectors": totals.duplicate_sectors,
            },
        }
