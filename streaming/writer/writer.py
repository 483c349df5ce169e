"""The scan writer: gathers counted frames of every node and writes one stempy-format HDF5 per scan.

One writer serves a session: node 0 (as numbered by the aggregator) hosts it. Nodes connect to it with
DEALER sockets (protocol.W_*). Per scan it
  * estimates the thresholds every node counts with, from the lowest-numbered complete frames the nodes
    offer (so streamed and offline counting of the same data use the same sample frames), unless they
    are fixed;
  * writes counted frames to the scan's HDF5 as they arrive, in any order, under a temporary name
    (counting.scan_file: the writer's memory does not grow with the scan; the module says why this design);
  * when every node reports the scan done (or nothing arrived for ``writer_deadline`` seconds), finishes
    the file in a background thread, so the next scan can stream meanwhile: masks and metadata, fsync,
    its final name (atomically, never over an existing file), then a JSON stop record beside it saying what
    exists: status, expected and written frames, completeness, checksum.

Nothing per scan waits on more than its data: the threshold estimation is compiled and loaded when the
writer starts (before its node reports ready), thresholds go out the moment the last node's samples are in,
and the file is finished the moment the last node is done.

Storage failures are fatal: the output directory is probed before serving (ScanWriterError if it is not
writable), and when a scan cannot be written (disk full, quota, read-only) its file is not left behind, its
stop record says "failed" with the OS reason, and ``error`` is set so the host stops. Every later scan would
fail the same way, so the writer's host fails loudly at once rather than streaming scans it cannot store.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from counting.geometry import FRAME_SHAPE, ScanShape
from counting.kernel import EventList, Thresholds
from counting.scan_file import ScanFile, ScanTally
from counting.thresholds import (
    ThresholdConfig,
    ThresholdError,
    estimate_thresholds,
    fixed_threshold_metadata,
    warm_up_estimation,
)
from streaming.protocol import control as p
from streaming.protocol.calibration import calibration_digest, calibration_parts
from streaming.protocol.record import ScanRecord, ScanStatus
from streaming.writer.files import ScanIds, ScanNaming, ScanWriterError, check_output_dir, write_scan

log = logging.getLogger(__name__)

__all__ = ["ScanWriter", "ScanWriterError", "WriterConfig"]


@dataclass(frozen=True)
class WriterConfig:
    """Where and how scans are written; built from settings by streaming.components."""

    output_dir: Path
    session_id: int
    name_template: str
    timezone: str  # the facility's: file names carry its local date and time
    fixed: Thresholds | None
    estimate: ThresholdConfig
    writer_deadline: float  # write what there is when a scan has been silent this long


@dataclass
class _Scan:
    begin: p.NodeScanBegin
    started: float
    scan_id: int  # unique in the output directory
    path: Path  # its final name
    file: ScanFile  # written as counted frames arrive
    nodes: dict[bytes, str] = field(default_factory=dict)  # identity -> node name
    done: dict[str, p.NodeScanDone] = field(default_factory=dict)
    samples: dict[int, np.ndarray] = field(default_factory=dict)
    samples_closed: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)  # nodes the aggregator lost during the scan
    thresholds: p.ScanThresholds | None = None
    frames: int = 0
    first_data: float = 0.0
    last_activity: float = 0.0


class ScanWriter:
    """Runs the writer loop on a bound ROUTER socket; use ``start()`` for a background thread."""

    def __init__(
        self,
        bind: str,
        config: WriterConfig,
        dark: np.ndarray | None,
        gain: np.ndarray | None = None,
        context: zmq.Context | None = None,
    ):
        check_output_dir(config.output_dir)  # before binding anything: nothing to undo when it fails
        if config.fixed is None:
            warm_up_estimation(
                config.estimate, dark, gain
            )  # so the first scan waits no longer than later ones
        self.config = config
        self.dark, self.gain = dark, gain
        self._calibration_parts = calibration_parts(dark, gain)
        self._calibration = calibration_digest(*self._calibration_parts)
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.setsockopt(zmq.RCVHWM, 0)  # events are small; never drop a node's counted frames
        self._sock.bind(bind)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._scans: dict[str, _Scan] = {}  # by scan key: a scan number may come again
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemstream-h5")
        self._pending: list[Future] = []
        self.records: list[ScanRecord] = []
        self.malformed = 0
        self.error: str | None = None  # set (once) when a scan or its stop record could not be written
        self._naming = ScanNaming(config.output_dir, config.name_template, config.session_id, config.timezone)
        self._ids = ScanIds(config.output_dir)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- running
    def start(self) -> ScanWriter:
        """Run the loop in a background thread."""
        self._thread = threading.Thread(target=self.run, name="stemstream-writer", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Serve nodes until stop() is called."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(100):
                    while self._sock.poll(0):
                        self._handle(self._sock.recv_multipart(copy=False))
                self._check_deadlines()
                self._reap()
        finally:
            self._sock.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish pending writes, then stop the loop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for fut in self._pending:
            fut.result(timeout)
        self._reap()
        self._pool.shutdown(wait=True)
        for scan in self._scans.values():  # never finished: nothing of them is left behind
            scan.file.discard()
        self._scans.clear()

    # ------------------------------------------------------------------------------------------- messages
    def _handle(self, frames: list) -> None:
        identity, kind = frames[0].bytes, frames[1].bytes
        try:
            if kind == p.W_BEGIN:
                self._on_begin(identity, p.decode(kind, frames[2].bytes, p.NodeScanBegin))
            elif kind == p.W_SAMPLES:
                self._on_samples(p.decode(kind, frames[2].bytes, p.SampleHeader), frames[3:])
            elif kind == p.W_EVENTS:
                self._on_events(p.decode(kind, frames[2].bytes, p.EventsHeader), frames[3:])
            elif kind == p.W_DONE:
                self._on_done(p.decode(kind, frames[2].bytes, p.NodeScanDone))
            else:
                raise p.ProtocolError(f"unexpected message {kind[:20]!r}")
        except (p.ProtocolError, ValueError, IndexError) as exc:
            self.malformed += 1
            log.warning("writer dropped a malformed message: %s", exc)

    def _on_begin(self, identity: bytes, begin: p.NodeScanBegin) -> None:
        key = _key(begin)
        scan = self._scans.get(key)
        if scan is None:
            started, scan_id = time.time(), self._ids.next()
            path = self._naming.path_for(scan_id, begin.scan_number, started)
            shape = ScanShape(begin.scan_width, begin.scan_height)
            scan = _Scan(begin, started, scan_id, path, ScanFile(path.parent, path.name, shape))
            scan.last_activity = time.monotonic()
            self._scans[key] = scan
            if scan.file.error is not None:
                log.error("scan %d: its file cannot be stored (%s)", begin.scan_number, scan.file.error)
            log.info(
                "scan %d (id %05d): %dx%d from %d node(s)",
                begin.scan_number,
                scan.scan_id,
                begin.scan_width,
                begin.scan_height,
                begin.n_nodes,
            )
            if self.config.fixed is not None:
                t = self.config.fixed
                scan.thresholds = p.ScanThresholds(
                    begin.scan_number, t.background, t.xray, fixed_threshold_metadata(t), self._calibration
                )
        scan.nodes[identity] = begin.name
        if scan.thresholds is not None:
            self._send(identity, scan.thresholds)

    def _on_samples(self, header: p.SampleHeader, parts: list) -> None:
        scan = self._scan(header)
        if scan.thresholds is not None:
            return  # fixed or already estimated: samples are not needed
        if len(parts) != len(header.frame_numbers):
            raise p.ProtocolError("sample frame count does not match its header")
        for number, part in zip(header.frame_numbers, parts, strict=True):
            scan.samples[int(number)] = np.frombuffer(part.buffer, np.uint16).reshape(FRAME_SHAPE).copy()
        if header.last:
            scan.samples_closed.add(header.name)
        scan.lost.update(header.lost)
        scan.last_activity = time.monotonic()
        self._maybe_estimate(scan)

    def _maybe_estimate(self, scan: _Scan, waited_out: bool = False) -> None:
        """Thresholds once every node closed its offer (or, waited_out, from what the others offered: a
        node that died before closing its offer must not leave the survivors' frames uncounted)."""
        offers = len(scan.samples_closed) + len(scan.lost - scan.samples_closed)  # lost nodes offer no more
        if scan.thresholds is not None or (offers < scan.begin.n_nodes and not waited_out):
            return
        cfg = self.config.estimate
        numbers = sorted(scan.samples)[: cfg.sample_frames]
        try:
            if not numbers:
                raise ThresholdError("no complete frame arrived, so thresholds cannot be estimated")
            est = estimate_thresholds(np.stack([scan.samples[n] for n in numbers]), self.dark, cfg, self.gain)
            scan.thresholds = p.ScanThresholds(
                scan.begin.scan_number,
                est.background_threshold,
                est.x_ray_threshold,
                est.metadata(),
                self._calibration,
            )
        except ThresholdError as exc:
            log.error("scan %d: %s", scan.begin.scan_number, exc)
            scan.thresholds = p.ScanThresholds(
                scan.begin.scan_number, float("nan"), float("nan"), {"error": str(exc)}
            )
        scan.samples.clear()
        for identity in scan.nodes:
            self._send(identity, scan.thresholds)

    def _on_events(self, header: p.EventsHeader, parts: list) -> None:
        scan = self._scan(header)
        if len(parts) != 5:
            raise p.ProtocolError("events message must carry 5 arrays")
        positions, numbers, masks, offsets, indices = (
            np.frombuffer(parts[0].buffer, np.int64),
            np.frombuffer(parts[1].buffer, np.int64),
            np.frombuffer(parts[2].buffer, np.uint8),
            np.frombuffer(parts[3].buffer, np.int64),
            np.frombuffer(parts[4].buffer, np.uint32),
        )
        n = header.frames
        if not (len(positions) == len(numbers) == len(masks) == n and len(offsets) == n + 1):
            raise p.ProtocolError("events arrays do not match the frame count")
        if offsets[0] != 0 or offsets[-1] != len(indices) or np.any(np.diff(offsets) < 0):
            raise p.ProtocolError("events offsets are inconsistent")
        failed = scan.file.error
        scan.file.add(positions, numbers, masks, EventList(indices.copy(), offsets.copy()))
        if scan.file.error is not None and failed is None:
            log.error("scan %d: storing it failed (%s); counting on", scan.begin.scan_number, scan.file.error)
        scan.frames += n
        scan.first_data = scan.first_data or time.time()
        scan.last_activity = time.monotonic()

    def _on_done(self, done: p.NodeScanDone) -> None:
        scan = self._scan(done)
        scan.done[done.name] = done
        scan.last_activity = time.monotonic()
        lost = {name for d in scan.done.values() for name in d.lost} - scan.done.keys()
        if len(scan.done) + len(lost) >= scan.begin.n_nodes:  # lost nodes never report: not waited for
            self._finish(scan)

    def _scan(self, message: p.SampleHeader | p.EventsHeader | p.NodeScanDone) -> _Scan:
        scan = self._scans.get(_key(message))
        if scan is None:
            raise p.ProtocolError(f"message for scan {message.scan_number}, which no node began")
        return scan

    def _send(self, identity: bytes, message: object) -> None:
        parts = [identity, *p.encode(message)]
        if isinstance(message, p.ScanThresholds):
            parts += list(self._calibration_parts)  # every node counts with the writer's dark and gain
        try:
            self._sock.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("could not send %s to a node: %s", type(message).__name__, exc)

    # ------------------------------------------------------------------------------------------- finishing
    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for scan in list(self._scans.values()):
            if (
                now - scan.last_activity > self.config.writer_deadline
                and scan.thresholds is None
                and scan.samples
            ):
                # Nodes wait for thresholds that wait for a node that went silent: estimate from what the
                # others offered, so they count and send what they hold; the deadline starts again.
                log.warning(
                    "scan %d: %d of %d node(s) offered threshold samples within %.0f s; estimating from "
                    "those",
                    scan.begin.scan_number,
                    len(scan.samples_closed),
                    scan.begin.n_nodes,
                    self.config.writer_deadline,
                )
                self._maybe_estimate(scan, waited_out=True)
                scan.last_activity = now
            elif now - scan.last_activity > self.config.writer_deadline:
                log.warning(
                    "scan %d: no data for %.0f s, writing what arrived",
                    scan.begin.scan_number,
                    self.config.writer_deadline,
                )
                self._finish(scan)

    def _finish(self, scan: _Scan) -> None:
        del self._scans[_key(scan.begin)]
        last = time.time()
        self._pending.append(self._pool.submit(self._write, scan, last))

    def _write(self, scan: _Scan, last_data: float) -> ScanRecord:
        try:
            return self._store(scan, last_data)
        finally:
            scan.file.discard()  # whatever is left of it (nothing, once stored), even after a bug

    def _store(self, scan: _Scan, last_data: float) -> ScanRecord:
        b = scan.begin
        reasons = sorted({d.reason for d in scan.done.values()}) or ["deadline"]
        t = scan.thresholds
        thresholds = [t.background, t.xray] if t is not None else [float("nan"), float("nan")]
        uid = uuid.uuid4().hex  # the scan's unique key everywhere (file, stop record, catalogue)
        meta = {
            "electron_counting": dict(t.metadata) if t is not None else {},
            "stemstream": {
                "scan_number": b.scan_number,
                "scan_id": scan.scan_id,
                "scan_key": b.scan_key,  # the aggregator's key: the live view finds the scan's file by it
                "scan_uuid": uid,
                "session_id": self.config.session_id,
                "aggregator_session": b.session_id,
                "nodes": b.n_nodes,
                "nodes_done": len(scan.done),
                "end_reasons": ",".join(reasons),
                "frames_counted": scan.frames,
                "incomplete_frames": sum(d.incomplete_frames for d in scan.done.values()),
                "counting_seconds": sum(d.counting_seconds for d in scan.done.values()),
                "late_sectors": sum(d.late_sectors for d in scan.done.values()),
                "evicted_batches": sum(d.evicted_slots for d in scan.done.values()),
                # What the frames were counted against: a zero dark is said, never implied.
                "dark_reference": "none: zero dark, fitted thresholds"
                if self.dark is None
                else f"float32 dark, digest {self._calibration[:16]}",
                "duplicate_sectors": sum(d.duplicates for d in scan.done.values()),
            },
        }
        meta["electron_counting"].pop("error", None)
        tally = scan.file.tally()
        record = self._record(scan, tally, scan.path, reasons, thresholds, last_data)
        record.scan_uuid = uid
        error = write_scan(
            scan.file,
            meta,
            scan.path,
            record,
            lambda: self._naming.path_for(scan.scan_id, b.scan_number, scan.started),
        )
        if error is not None:
            log.error("scan %d: %s", b.scan_number, error)
            self._fail(error)
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

    def _fail(self, message: str) -> None:
        # Only the first failure is reported: later ones are its consequences.
        if self.error is None:
            self.error = message

    def _record(
        self,
        scan: _Scan,
        counted: ScanTally,
        path: Path,
        reasons: list[str],
        thresholds: list[float],
        last_data: float,
    ) -> ScanRecord:
        b = scan.begin
        lost = sum(max(d.sectors_sent - d.sectors, 0) for d in scan.done.values())
        complete = counted.complete_frames == b.scan_width * b.scan_height * counted.frames_per_position
        failed = scan.thresholds is None or not np.isfinite(thresholds[0])
        if failed:
            status = ScanStatus.FAILED
        else:
            status = ScanStatus.COMPLETE if complete and lost == 0 else ScanStatus.INCOMPLETE
        return ScanRecord(
            scan_number=b.scan_number,
            scan_id=scan.scan_id,
            status=status,
            path=str(path),
            scan_width=b.scan_width,
            scan_height=b.scan_height,
            expected_frames=b.scan_width * b.scan_height * counted.frames_per_position,
            frames_written=counted.num_frames,
            complete_frames=counted.complete_frames,
            completeness=counted.completeness,
            events=counted.num_events,
            nodes=b.n_nodes,
            nodes_done=len(scan.done),
            reasons=reasons,
            sectors_lost_in_transit=lost,
            thresholds=thresholds,
            error=(scan.thresholds.metadata.get("error") if failed and scan.thresholds else None),
            first_data_time=scan.first_data,
            last_data_time=last_data,
            counting_seconds=sum(d.counting_seconds for d in scan.done.values()),
        )

    def _reap(self) -> None:
        still = []
        for fut in self._pending:
            if fut.done():
                try:
                    self.records.append(fut.result())
                except Exception:  # a bug, not a data problem: keep serving, but say it loudly
                    log.exception("writing a scan failed")
            else:
                still.append(fut)
        self._pending = still


def _key(message: p.NodeScanBegin | p.SampleHeader | p.EventsHeader | p.NodeScanDone) -> str:
    """The scan a message belongs to: its aggregator key (the number alone, from older nodes)."""
    return message.scan_key or f"number-{message.scan_number}"
