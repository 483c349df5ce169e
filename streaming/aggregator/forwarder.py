"""A forwarding process: one of the aggregator's K data paths (``streaming.aggregator_processes``).

Forwarder i (1 <= i < K; the aggregator itself is path 0) binds every receiver address and the node address
at port + i x ``aggregator_port_stride`` (port 0: any free port) and tells the aggregator where (``up``).
The receivers' PUSH sockets connect to every path, so ZeroMQ spreads their sectors over the K processes;
each node connects out to every path. A forwarder routes each sector by the same rule as the aggregator
(``DataPath.route`` over the routes the aggregator sends), so every sector of a frame reaches the same
node whichever process forwards it. It decides nothing about scans: the first sector of a scan it has no
word on is held and reported (``seen``) and it reads no more until the aggregator says ``begin`` or
``drop``; counts go back as ``progress`` every few milliseconds; on ``end`` it sends each node its own
``end`` (after everything it forwarded to that node, on the same connection). No state is shared: the
aggregator is the one control point, the forwarders are many data paths.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field

import zmq

from streaming.aggregator.config import AggregatorConfig
from streaming.aggregator.data_path import DataPath, PathSockets, weak
from streaming.protocol import control as p
from streaming.protocol import paths as f
from streaming.protocol.reasons import Verdict
from streaming.protocol.sector import SectorHeader, WireError, decode_message
from streaming.transport.addresses import offset_address
from streaming.transport.ratelog import RateLimitedLog
from streaming.transport.router_io import Sent, drain
from streaming.transport.security import CurveServerConfig

__all__ = ["Forwarder", "offset_address", "run_forwarder"]  # offset_address: its old home, still imported

log = logging.getLogger(__name__)

_REPORT_EVERY = 0.005  # seconds between progress reports while data flows
_DRAIN_BATCH = 256
_MAX_ATTACHED = 1024  # names attached at once: a flood of made-up names cannot grow the table without end


@dataclass
class _Counts:
    """What happened since the last progress report."""

    received: int = 0
    module_received: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    threads: list[list[int]] = field(default_factory=list)
    sent: dict[int, int] = field(default_factory=dict)
    per_node: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    unroutable: int = 0
    late: int = 0
    refused: int = 0

    def any(self) -> bool:
        return bool(
            self.received or self.sent or self.malformed or self.unroutable or self.late or self.refused
        )

    def dropped(self, why: str) -> None:
        """A sector of a scan the aggregator called late or refused."""
        if why == Verdict.LATE:
            self.late += 1
        else:
            self.refused += 1


@dataclass
class _PathScan:
    """The scan this forwarder streams: its plan, and what it sent each node."""

    plan: f.Begin
    threads: set[tuple[int, int]] = field(default_factory=set)
    sent: dict[str, int] = field(default_factory=dict)


class Forwarder:
    """One forwarding process's sockets and loop; see the module docstring."""

    def __init__(
        self, config: AggregatorConfig, curve: CurveServerConfig | None, index: int, hub: str
    ) -> None:
        self.config, self.index = config, index
        self.ctx = zmq.Context()
        self.sockets = PathSockets(config.path, index, self.ctx, curve)
        self.receivers, self.router = self.sockets.receivers, self.sockets.router
        self.hub = self.sockets.socket(zmq.DEALER)
        self.hub.connect(hub)
        self.path = DataPath(
            self.sockets,
            index,
            config.path,
            identity=self._identity,  # strong: asked on every send (the loop closes the sockets itself)
            stop=weak(self._stopping),
            wait=weak(self._wait_for_room),
            failed=weak(self._send_failed),
        )
        self.attached: dict[str, bytes] = {}  # node name -> identity on this forwarder's node socket
        self._log = RateLimitedLog(log)
        self.scan: _PathScan | None = None
        self._held: tuple[int, list] | None = None  # (scan number, parts) waiting for begin or drop
        self._dropping: dict[int, tuple[str, float]] = {}  # scan number -> (why, last sector)
        self._counts = _Counts()
        self._last_report = 0.0
        self._stop = False
        self._parent = os.getppid()  # an aggregator that died leaves no forwarder behind
        self._tell(
            f.Up(
                index=index,
                receivers=self.sockets.receiver_endpoints,
                nodes=self.sockets.nodes_endpoint,
                pid=os.getpid(),
            )
        )

    def _tell(self, message: object) -> None:
        self.hub.send_multipart(f.encode(message))

    # ------------------------------------------------------------------------------------------ loop
    def run(self, stop_event: threading.Event | None = None) -> None:
        """Serve until the aggregator says stop (or stop_event is set, or the hub goes silent)."""
        reading = zmq.Poller()
        waiting = zmq.Poller()
        for poller in (reading, waiting):
            poller.register(self.hub, zmq.POLLIN)
            poller.register(self.router, zmq.POLLIN)
        for sock in self.receivers:
            reading.register(sock, zmq.POLLIN)
        try:
            while not self._stop and not (stop_event is not None and stop_event.is_set()):
                poller = waiting if self._held is not None else reading
                events = dict(poller.poll(10))
                if self.hub in events:
                    self._service_hub()
                if self.router in events:
                    self._service_nodes()
                if self._held is None:
                    for sock in self.receivers:
                        if sock in events:
                            self._drain(sock)
                self._maybe_report()
        finally:
            self._report()
            self.close()

    def close(self) -> None:
        """Close every socket (bounded linger) and the authenticator."""
        self.sockets.close()
        self.ctx.term()

    def _stopping(self) -> bool:
        return self._stop

    def _maybe_report(self) -> None:
        now = time.monotonic()
        if now - self._last_report >= _REPORT_EVERY and self._counts.any():
            self._report()
        elif now - self._last_report >= self.config.heartbeat:
            self._report()  # also a heartbeat
            if os.getppid() != self._parent:
                log.warning("forwarder %d: the aggregator is gone; stopping", self.index)
                self._stop = True

    def _report(self) -> None:
        c, self._counts = self._counts, _Counts()
        key = self.scan.plan.key if self.scan is not None else ""
        self._last_report = time.monotonic()
        with suppress(zmq.ZMQError):
            self._tell(
                f.Progress(
                    index=self.index,
                    key=key,
                    received=c.received,
                    module_received=c.module_received,
                    threads=c.threads,
                    sent=c.sent,
                    per_node=c.per_node,
                    malformed=c.malformed,
                    unroutable=c.unroutable,
                    late=c.late,
                    refused=c.refused,
                )
            )

    # ------------------------------------------------------------------------------------------ data
    def _drain(self, sock: zmq.Socket) -> None:
        drain(sock, self._on_sector, _DRAIN_BATCH, lambda: self._held is not None)

    def _on_sector(self, parts: list) -> None:
        try:
            header, _ = decode_message(parts)
        except WireError:
            self._counts.malformed += 1
            return
        scan = self.scan
        if scan is not None and header.scan_number == scan.plan.scan_number:
            self._forward(scan, header, parts)
            return
        number = header.scan_number
        if self._drop(number):
            return
        self._held = (number, parts)
        self._tell(f.Seen(index=self.index, header=bytes(parts[0].buffer)))

    def _drop(self, number: int) -> bool:
        """Count and drop a sector of a scan the aggregator called late or refused (for scan_deadline after
        its last sector: then the same number is a new scan, the detector resets its numbers)."""
        now = time.monotonic()
        if self.path.ended.is_late(number, now):
            self._counts.late += 1
            return True
        entry = self._dropping.get(number)
        if entry is None or now - entry[1] >= self.config.scan_deadline:
            self._dropping.pop(number, None)
            return False
        self._dropping[number] = (entry[0], now)
        self._counts.dropped(entry[0])
        return True

    def _forward(self, scan: _PathScan, header: SectorHeader, parts: list) -> None:
        c = self._counts
        c.received += 1
        c.module_received[header.module] += 1
        thread = (header.module, header.thread_id)
        if thread not in scan.threads:
            scan.threads.add(thread)
            c.threads.append([header.module, header.thread_id, header.frames_this_thread])
        index = self.path.route(header.frame_number)
        if index is None:
            c.unroutable += 1
            return
        name = self.path.names[index]
        delivered = self.path.send(index, [p.DATA, *parts])
        c = self._counts  # a wait in the send may have reported (and replaced) the counts meanwhile
        if delivered:
            scan.sent[name] = scan.sent.get(name, 0) + 1
            c.sent[index] = c.sent.get(index, 0) + 1
            c.per_node[name] = c.per_node.get(name, 0) + 1
        else:
            c.unroutable += 1

    def _identity(self, index: int) -> bytes | None:
        name = self.path.names.get(index)
        return None if name is None else self.attached.get(name)

    def _send_failed(self, index: int, outcome: Sent) -> None:
        if outcome is Sent.UNREACHABLE:  # gone: the aggregator reroutes when it notices
            self.attached.pop(self.path.names.get(index, ""), None)

    def _wait_for_room(self) -> None:
        if self.hub.poll(1):
            self._service_hub()
        self._maybe_report()

    # ------------------------------------------------------------------------------------------ control
    def _service_nodes(self) -> None:
        for _ in range(64):
            try:
                identity, *rest = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if len(rest) != 2 or rest[0] != p.ATTACH:
                    raise p.ProtocolError(f"unexpected message {rest[:1]!r}")
                self._on_attach(identity, p.decode(p.ATTACH, rest[1], p.Attach))
            except p.ProtocolError as exc:
                self._log("node message ignored", "forwarder %d: %s", self.index, exc)

    def _on_attach(self, identity: bytes, attach: p.Attach) -> None:
        """A node's name is bound to the connection that attached it, until that connection is gone (a
        restarted node): another connection under the same name is refused."""
        old = self.attached.get(attach.name)
        if old is None and len(self.attached) >= _MAX_ATTACHED:
            raise p.ProtocolError(f"{len(self.attached)} names attached already")
        if old is not None and old != identity and self._reachable(old, attach.name):
            raise p.ProtocolError(f"{attach.name!r} is attached on another connection")
        self.attached[attach.name] = identity
        with suppress(zmq.ZMQError):
            answer = p.Attach(name=attach.name, path=self.index)
            self.router.send_multipart([identity, *p.encode(answer)], zmq.NOBLOCK)

    def _reachable(self, identity: bytes, name: str) -> bool:
        """Whether a node's connection is still there: its attach answer again (nodes take it again), which
        ROUTER_MANDATORY refuses for a vanished peer."""
        try:
            self.router.send_multipart([identity, *p.encode(p.Attach(name, self.index))], zmq.NOBLOCK)
        except zmq.Again:
            return True
        except zmq.ZMQError as exc:
            return exc.errno != zmq.EHOSTUNREACH
        return True

    def _service_hub(self) -> None:
        for _ in range(64):
            try:
                parts = self.hub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = f.decode(parts)
            except p.ProtocolError as exc:
                self._log("hub message ignored", "forwarder %d: %s", self.index, exc)
                continue
            self._on_hub(message)

    def _on_hub(self, message: object) -> None:
        if isinstance(message, f.Begin):
            self._begin(message)
        elif isinstance(message, f.End):
            self._end(message)
        elif isinstance(message, f.Drop):
            self._dropping[message.scan_number] = (message.why, time.monotonic())
            if self._held is not None and self._held[0] == message.scan_number:
                self._held = None
                self._counts.dropped(message.why)
        elif isinstance(message, f.Routes):
            self.path.set_routes(message.routes)
        elif isinstance(message, f.Stop):
            self._stop = True

    def _begin(self, plan: f.Begin) -> None:
        if self.scan is not None:
            self._report()  # counts of the previous scan go under its key
        self.path.set_routes(plan.routes)
        self._dropping.pop(plan.scan_number, None)
        self.path.ended.discard(plan.scan_number)
        self.scan = scan = _PathScan(plan)
        self.path.begin(plan)
        held, self._held = self._held, None
        if held is not None:
            if held[0] == plan.scan_number:
                header, _ = decode_message(held[1])
                self._forward(scan, header, held[1])
            else:
                self._on_sector(held[1])  # another scan's: ask again

    def _end(self, end: f.End) -> None:
        scan = self.scan
        if scan is None or scan.plan.key != end.key:
            return
        self._report()
        self.scan = None
        self.path.ended.add(end.scan_number, time.monotonic())
        self.path.end(end, lambda _, name: scan.sent.get(name, 0), [])


def run_forwarder(
    config: AggregatorConfig, curve: CurveServerConfig | None, index: int, hub: str, log_level: int
) -> None:
    """A forwarding process's entry point (multiprocessing spawn): serve until the aggregator says stop."""
    import signal

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the aggregator stops its forwarders itself
    try:
        forwarder = Forwarder(config, curve, index, hub)
    except zmq.ZMQError as exc:
        logging.getLogger(__name__).error("forwarding process %d cannot start: %s", index, exc)
        raise SystemExit(1) from None
    forwarder.run()
