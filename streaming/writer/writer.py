"""The scan writer: gathers counted frames of every node and writes one stempy-format HDF5 per scan.

One writer serves a session: node 0 (as numbered by the aggregator) hosts it. Nodes connect to it with
DEALER sockets (protocol.W_*). Per scan it
  * has the thresholds every node counts with decided (writer.thresholds: fixed, or estimated from the
    lowest-numbered complete frames the nodes offer, so streamed and offline counting of the same data
    use the same sample frames);
  * writes counted frames to the scan's HDF5 as they arrive, in any order, under a temporary name
    (counting.scan_file: the writer's memory does not grow with the scan; the module says why this design);
  * when every node reports the scan done (or nothing arrived for ``writer_deadline`` seconds), finishes
    the file in a background thread, so the next scan can stream meanwhile (writer.finish): masks and
    metadata, fsync, its final name (atomically, never over an existing file), then a JSON stop record
    beside it saying what exists: status, expected and written frames, completeness, checksum. The stop
    record is built once; the HDF5's metadata takes the same facts from it.

Nothing per scan waits on more than its data: the threshold estimation is compiled and loaded when the
writer starts (before its node reports ready), thresholds go out the moment the last node's samples are in,
and the file is finished the moment the last node is done.

Storage failures are fatal: the output directory is probed before serving (ScanWriterError if it is not
writable, or if finished files could not take their names there), and when a scan cannot be written (disk
full, quota, read-only) its unfinished file is not left behind (a finished one is never removed: it is kept
under a recoverable name), its stop record says "failed" with the OS reason, and ``error`` is set so the
host stops. A writer stopped mid-scan writes what arrived of each open scan, with its stop record. Every later scan would
fail the same way, so the writer's host fails loudly at once rather than streaming scans it cannot store.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from counting.geometry import ScanShape
from counting.kernel import EventList, Thresholds
from counting.scan_file import MAX_POSITIONS, ScanFile
from counting.storage.hdf5 import FinalName
from counting.thresholds import ThresholdConfig
from streaming.protocol import control as p
from streaming.protocol.reasons import EndReason
from streaming.protocol.record import ScanRecord
from streaming.transport.ratelog import RateLimitedLog
from streaming.transport.security import CurveServerConfig, apply_server
from streaming.writer.files import ScanIds, ScanNaming, ScanWriterError, check_output_dir
from streaming.writer.finish import ScanFinisher
from streaming.writer.scan import OpenScan, scan_key
from streaming.writer.thresholds import SampleOffer, ThresholdBroker

log = logging.getLogger(__name__)

__all__ = ["ScanWriter", "ScanWriterError", "WriterConfig"]

RCVHWM = 1000  # messages queued per node connection; beyond it ZeroMQ stops reading (TCP back-pressure)
MAX_OPEN_SCANS = 64  # a session has one or two open at a time; forged begins must not take ids and files


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


class ScanWriter:
    """Runs the writer loop on a bound ROUTER socket; use ``start()`` for a background thread."""

    def __init__(
        self,
        bind: str,
        config: WriterConfig,
        dark: np.ndarray | None,
        gain: np.ndarray | None = None,
        context: zmq.Context | None = None,
        *,
        max_positions: int = MAX_POSITIONS,
        final_name: FinalName | None = None,
        curve: CurveServerConfig | None = None,
    ):
        # Before binding anything: nothing to undo when it fails. It tries what the writer will do.
        check_output_dir(config.output_dir, final_name)
        self.config = config
        self._max_positions, self._final_name = max_positions, final_name
        self.dark, self.gain = dark, gain
        self._thresholds = ThresholdBroker(config.fixed, config.estimate, dark, gain)
        # CURVE: a context of its own, so its ZAP handler (one per context) is the writer's alone.
        self._own_ctx = zmq.Context() if curve is not None else None
        self._ctx = self._own_ctx or context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        # Inbound ROUTER queues never drop: a full one makes ZeroMQ stop reading that node's connection.
        self._sock.setsockopt(zmq.RCVHWM, RCVHWM)
        self._auth = apply_server(self._sock, curve, self._ctx) if curve is not None else None
        self._sock.bind(bind)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._scans: dict[str, OpenScan] = {}  # by scan key: a scan number may come again
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemstream-h5")
        self._pending: list[Future] = []
        self.records: list[ScanRecord] = []
        self.malformed = 0
        self._log_malformed = RateLimitedLog(log)
        self.error: str | None = None  # set (once) when a scan or its stop record could not be written
        self._naming = ScanNaming(config.output_dir, config.name_template, config.session_id, config.timezone)
        self._ids = ScanIds(config.output_dir)
        self._finisher = ScanFinisher(
            self._naming, config.session_id, self._thresholds.dark_reference, self._fail
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- running
    def start(self) -> ScanWriter:
        """Run the loop in a background thread."""
        self._thread = threading.Thread(target=self.run, name="stemstream-writer", daemon=True)
        self._thread.start()
        return self

    @property
    def died(self) -> bool:
        """True when the loop thread ended without being stopped."""
        return self._thread is not None and not self._thread.is_alive() and not self._stop.is_set()

    def run(self) -> None:
        """Serve nodes until stop() is called; input never ends the loop, a bug in it sets ``error``."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(100):
                    while self._sock.poll(0):
                        self._handle(self._sock.recv_multipart(copy=False))
                self._check_deadlines()
                self._reap()
        except Exception as exc:
            log.exception("the scan writer loop failed")
            self._fail(f"the scan writer loop failed: {type(exc).__name__}: {exc}")  # its host stops
        finally:
            self._sock.close()
            if self._auth is not None:
                self._auth.stop()
            if self._own_ctx is not None:
                self._own_ctx.term()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop, then write every scan still open as far as it came (its stop record says
        ``shutdown``) and wait for the pending writes, all within about ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():  # the loop no longer touches the scans
            for scan in list(self._scans.values()):
                log.warning(
                    "scan %d: the writer stops mid-scan; writing the %d frame(s) that arrived",
                    scan.begin.scan_number,
                    scan.frames,
                )
                self._finish(scan, cut_short=EndReason.SHUTDOWN)
        elif self._scans:
            log.error(
                "the writer loop did not stop within %.0f s; %d open scan(s) not written",
                timeout,
                len(self._scans),
            )
        _, running = wait(self._pending, max(deadline - time.monotonic(), 0.0))
        self._reap()
        if running:
            log.error("%d scan(s) still being written after %.0f s; not waited for", len(running), timeout)
        self._pool.shutdown(wait=not running)

    # ------------------------------------------------------------------------------------------- messages
    def _handle(self, frames: list) -> None:
        """One message; whatever it holds, it never ends the loop (counted as malformed and dropped)."""
        try:
            if len(frames) < 3:
                raise p.ProtocolError(f"a message of {len(frames) - 1} part(s)")
            identity, kind = frames[0].bytes, frames[1].bytes
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
        except OSError as exc:  # storage, not input: every later scan would fail the same way
            log.exception("the scan writer cannot store")
            self._fail(f"storing failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - input must never end the writer loop
            self.malformed += 1
            self._log_malformed("writer dropped a malformed message", "%s: %s", type(exc).__name__, exc)

    def _on_begin(self, identity: bytes, begin: p.NodeScanBegin) -> None:
        scan = self._scans.get(scan_key(begin))
        if scan is None:
            self._admit(begin)
            scan = self._scans[scan_key(begin)] = self._open(begin)
        scan.nodes[identity] = begin.name
        if scan.thresholds is not None:
            self._send_thresholds(identity, scan.thresholds)

    def _admit(self, begin: p.NodeScanBegin) -> None:
        """Refuse, before a scan id or a file is taken, a begin no node would send: a scan above the size
        limit (nodes refuse those themselves), or one more open scan than MAX_OPEN_SCANS."""
        positions = begin.scan_width * begin.scan_height
        if positions > self._max_positions:
            raise p.ProtocolError(
                f"scan {begin.scan_number}: {begin.scan_width}x{begin.scan_height} is above "
                f"streaming.max_scan_positions ({self._max_positions})"
            )
        if len(self._scans) >= MAX_OPEN_SCANS:
            raise p.ProtocolError(f"scan {begin.scan_number}: {MAX_OPEN_SCANS} scans are open already")

    def _open(self, begin: p.NodeScanBegin) -> OpenScan:
        """A scan's first begin: its id, its final name and its file (written as counted frames arrive)."""
        started, scan_id = time.time(), self._ids.next()
        path = self._naming.path_for(scan_id, begin.scan_number, started)
        shape = ScanShape(begin.scan_width, begin.scan_height)
        scan = OpenScan(
            begin=begin,
            started=started,
            scan_id=scan_id,
            path=path,
            file=ScanFile(
                path.parent, path.name, shape, max_positions=self._max_positions, final_name=self._final_name
            ),
            samples=SampleOffer(begin.n_nodes, limit=self.config.estimate.sample_frames),
            thresholds=self._thresholds.fixed(begin.scan_number),
        )
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
        return scan

    def _on_samples(self, header: p.SampleHeader, parts: list) -> None:
        scan = self._scan(header)
        if scan.thresholds is not None:
            return  # fixed or already estimated: samples are not needed
        scan.samples.add(header, parts)
        scan.touch()
        self._settle_thresholds(scan)

    def _settle_thresholds(self, scan: OpenScan, *, waited_out: bool = False) -> None:
        """Send the scan's thresholds to its nodes once the broker can decide them."""
        if scan.thresholds is not None:
            return
        scan.thresholds = self._thresholds.settle(scan.begin.scan_number, scan.samples, waited_out=waited_out)
        if scan.thresholds is not None:
            for identity in scan.nodes:
                self._send_thresholds(identity, scan.thresholds)

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
        scan.touch()

    def _on_done(self, done: p.NodeScanDone) -> None:
        scan = self._scan(done)
        scan.done[done.name] = done
        scan.touch()
        if scan.all_done:
            self._finish(scan)

    def _scan(self, message: p.SampleHeader | p.EventsHeader | p.NodeScanDone) -> OpenScan:
        scan = self._scans.get(scan_key(message))
        if scan is None:
            raise p.ProtocolError(f"message for scan {message.scan_number}, which no node began")
        return scan

    def _send_thresholds(self, identity: bytes, thresholds: p.ScanThresholds) -> None:
        # Every node counts with the writer's dark and gain: they follow the thresholds as two parts.
        parts = [identity, *p.encode(thresholds), *self._thresholds.calibration_parts]
        try:
            self._sock.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("could not send %s to a node: %s", type(thresholds).__name__, exc)

    # ------------------------------------------------------------------------------------------- finishing
    def _check_deadlines(self) -> None:
        now = time.monotonic()
        deadline = self.config.writer_deadline
        for scan in list(self._scans.values()):
            if scan.silent_for(now) <= deadline:
                continue
            if scan.thresholds is None and scan.samples.frames:
                # Nodes wait for thresholds that wait for a node that went silent: estimate from what the
                # others offered, so they count and send what they hold; the deadline starts again.
                log.warning(
                    "scan %d: %d of %d node(s) offered threshold samples within %.0f s; estimating from "
                    "those",
                    scan.begin.scan_number,
                    len(scan.samples.closed),
                    scan.begin.n_nodes,
                    deadline,
                )
                self._settle_thresholds(scan, waited_out=True)
                scan.last_activity = now
            else:
                log.warning(
                    "scan %d: no data for %.0f s, writing what arrived", scan.begin.scan_number, deadline
                )
                self._finish(scan)

    def _finish(self, scan: OpenScan, cut_short: EndReason | None = None) -> None:
        del self._scans[scan_key(scan.begin)]
        self._pending.append(self._pool.submit(self._finisher, scan, time.time(), cut_short))

    def _fail(self, message: str) -> None:
        # Only the first failure is reported: later ones are its consequences.
        if self.error is None:
            self.error = message

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
