"""The aggregator: pulls sectors from the four receivers and forwards whole frames to N counting nodes.

Sockets: one PULL bound per receiver address, one ROUTER bound for the nodes (nodes connect outbound with
DEALERs; ROUTER_MANDATORY so a vanished node is an error, not a silent drop; ROUTER_HANDOVER so a
reconnect with the same identity takes over), and an optional PUB for monitors.

Arm handshake: the receivers are polled only while a scan is streaming, or when all N nodes are
connected and READY. Until then sectors wait in the senders' queues (back-pressure up to their HWM, then
their send timeout), so nothing is lost while nodes start. A scan starts streaming when all N nodes are
ready; once it streams it continues until it ends. Nodes re-send READY after ``done`` to arm for the next
scan.

Per sector: validate it (malformed messages are counted and dropped), route it by frame number (all four
sectors of a frame go to one node) and forward the received frames untouched (zero-copy). A scan ends
when all its expected sectors arrived ("complete"), when ``scan_deadline`` seconds pass without one of
its sectors ("deadline": lost data never hangs anything), or when a sector of a newer scan arrives
("superseded"); every node then gets ``end`` with what it was sent. Sectors of an ended scan are "late"
and dropped. See streaming.protocol.control for the messages.

Scale-out: with ``streaming.aggregator_processes`` K > 1 the aggregator starts K - 1 forwarding processes
(streaming.aggregator.forwarder, streaming.aggregator.hub) and stays the one control point: it begins and ends every
scan, holds the routes and the monitor; the processes forward (see streaming.aggregator.forwarding).

Parts, each built here with its collaborators: the data path it shares with the forwarding processes
(streaming.aggregator.data_path: sockets, routes, sends, ended scans, per-node begin and end), the
admission of another scan's sectors (admission: a Verdict), the node conversation (control: NodeControl)
and the forwarding processes' side (forwarding: ForwardingControl). This class is the loop that joins them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import zmq

from streaming.aggregator.admission import Admission
from streaming.aggregator.config import AggregatorConfig
from streaming.aggregator.control import NodeControl
from streaming.aggregator.data_path import DataPath, weak
from streaming.aggregator.forwarding import ForwardingControl
from streaming.aggregator.hub import ForwarderHub
from streaming.aggregator.open_scan import OpenScan
from streaming.aggregator.registry import NodeEntry, NodeRegistry
from streaming.aggregator.sockets import AggregatorSockets, describe
from streaming.aggregator.stats import AggregatorStats, log_started, monitor_state
from streaming.protocol import control as p
from streaming.protocol import paths as f
from streaming.protocol.reasons import EndReason, Verdict
from streaming.protocol.sector import SectorHeader, WireError, decode_message
from streaming.settings import StreamingSettings
from streaming.signals import STOP_GRACE_S, stop_on_signals
from streaming.transport.router_io import Sent, drain
from streaming.transport.security import CurveServerConfig

log = logging.getLogger(__name__)

_DRAIN_BATCH = 256  # sectors taken from one receiver before looking at control messages and timers
_BLOCKED_POLL_MS = 2  # while a node's queue is full: how long to wait between send attempts
_MAX_POLL_MS = 100


class Aggregator:
    """Receives sectors, forwards frames to nodes, ends scans; see the module docstring.

    config: an AggregatorConfig (streaming.components.aggregator_config), or the streaming settings it is
    built from (receivers, nodes_bind, n_nodes, monitor_bind, scan_deadline, heartbeat, node_timeout, the
    aggregator_* queues, stall timeout and processes; port 0 picks a free port, see receiver_endpoints).
    curve: CURVE server keys and allowed client keys for the node and monitor sockets (None: plain, for
    loopback). context: a zmq.Context to use (default: its own).

    Its parts call back into it through weak references (data_path.weak): no reference cycle.
    """

    def __init__(
        self,
        config: AggregatorConfig | StreamingSettings,
        curve: CurveServerConfig | None = None,
        *,
        context: zmq.Context | None = None,
    ) -> None:
        cfg = config if isinstance(config, AggregatorConfig) else AggregatorConfig.of(config)
        self.config, self.n_nodes = cfg, cfg.n_nodes
        self.scan_deadline, self.heartbeat = cfg.scan_deadline, cfg.heartbeat
        self.session_id = int.from_bytes(os.urandom(4), "little")
        self.security = describe(curve)
        self.stats = AggregatorStats()
        self.sockets = AggregatorSockets(cfg.path, cfg.monitor_bind, curve, context)  # ports known at once
        self._receivers, self._router = self.sockets.receivers, self.sockets.router
        self._monitor = self.sockets.monitor
        # The forwarding processes 1..K-1 (K = aggregator_processes), if any.
        self.forwarding = ForwardingControl.start(cfg, curve, self.sockets, self.stats)
        self.hub: ForwarderHub | None = self.forwarding.hub if self.forwarding is not None else None
        self.nodes = NodeRegistry(cfg.n_nodes)
        self.path = DataPath(
            self.sockets.path,
            0,
            cfg.path,
            identity=self.nodes.identity,
            stop=weak(self._stop_requested),
            wait=weak(self._wait_for_room),
            failed=weak(self._send_failed),
        )
        self.admission = Admission(
            self.nodes, self.path.ended, self.stats, cfg.scan_deadline, cfg.path.max_scan_positions
        )
        self.control = NodeControl(
            self.nodes,
            self.path,
            self.forwarding,
            session_id=self.session_id,
            node_timeout=cfg.node_timeout,
            joined=weak(self._joined),
            lost=weak(self._lost),
            publish=weak(self._publish_state),
        )
        self._scan: OpenScan | None = None
        self._lost_unsaid = False  # the open scan lost a node its other nodes have not been told of
        self._next_state = 0.0
        self._stopping = False
        self._stop_event: threading.Event | None = None
        self._until: Callable[[AggregatorStats], bool] | None = None
        self._end: float | None = None

    @property
    def receiver_endpoints(self) -> list[str]:
        """The bound receiver addresses (real ports when bound to port 0); with forwarding processes, each
        receiver's addresses on every process, comma-separated (a receiver connects to all of them)."""
        own = list(self.sockets.endpoints["receivers"])
        return own if self.forwarding is None else self.forwarding.receiver_endpoints(own)

    @property
    def nodes_endpoint(self) -> str:
        """The bound node ROUTER address."""
        return self.sockets.endpoints["nodes"]

    @property
    def monitor_endpoint(self) -> str | None:
        """The bound monitor PUB address, if any."""
        return self.sockets.endpoints["monitor"]

    def __enter__(self) -> Aggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the forwarding processes, close the sockets (bounded linger), stop the CURVE
        authenticator; idempotent."""
        if self.hub is not None:
            self.hub.stop()
        self.sockets.close()

    # ------------------------------------------------------------------------------------------ loop
    def run(
        self,
        stop_event: threading.Event | None = None,
        until: Callable[[AggregatorStats], bool] | None = None,
        timeout: float | None = None,
    ) -> AggregatorStats:
        """Serve until stop_event is set, until(stats) is true, or timeout seconds pass; then end an open
        scan, say bye to the nodes and close the sockets (bounded linger). Returns the counters."""
        # Kept as attributes (not a closure over self: a reference cycle would leave the sockets and the
        # context to the garbage collector, whose finalizer order can hang the context's term()).
        self._stop_event, self._until = stop_event, until
        self._end = None if timeout is None else time.monotonic() + timeout
        log_started(self.receiver_endpoints, self.sockets.endpoints, self.n_nodes, self.security, self.config)
        try:
            while not self._stop_requested():
                self._step()
        finally:
            try:
                self._shutdown()
            finally:
                self.close()
        return self.stats

    def _stop_requested(self) -> bool:
        """Also asked while a send blocks on a full node, so a stop never waits for stall_timeout."""
        self._stopping = (
            self._stopping
            or (self._stop_event is not None and self._stop_event.is_set())
            or (self._until is not None and self._until(self.stats))
            or (self._end is not None and time.monotonic() >= self._end)
        )
        return self._stopping

    def _step(self) -> None:
        """One poll: control messages, then sectors (when armed or streaming, and before the first arm, to
        refuse them), then timers."""
        self._say_lost()
        self._maybe_begin_held()
        adm = self.admission
        armed = adm.check_armed()
        streaming = self._scan is not None or (adm.held is None and armed) or not adm.armed_once
        poller = self.sockets.data_poller if streaming else self.sockets.control_poller
        events = dict(poller.poll(self._poll_ms()))
        if self._router in events:
            self.control.service()
        if self.forwarding is not None and self.forwarding.socket in events:
            self._service_hub()
        if streaming:
            for sock in self._receivers:
                if sock in events:
                    self._drain(sock)
        now = time.monotonic()
        scan = self._scan
        if scan is not None and now - scan.last_sector >= self.scan_deadline:
            self._end_scan(EndReason.DEADLINE)
        if now >= self._next_state:
            self.control.check_liveness(now)
            self._publish_state()

    def _poll_ms(self) -> int:
        now = time.monotonic()
        wait = min(self._next_state - now, _MAX_POLL_MS / 1000)
        if self._scan is not None:
            wait = min(wait, self._scan.last_sector + self.scan_deadline - now)
        return max(0, int(wait * 1000) + 1)

    def _drain(self, sock: zmq.Socket) -> None:
        """Take up to a batch of messages from one receiver without blocking; a new scan that waits for
        the arm stops the taking."""
        drain(sock, self._on_message, _DRAIN_BATCH, lambda: self.admission.held is not None)

    # ------------------------------------------------------------------------------------------ data
    def _on_message(self, parts: list) -> None:
        try:
            header, _ = decode_message(parts)
        except WireError as exc:
            self.admission.count_malformed(exc, self._scan)
            return
        scan = self._scan
        if scan is not None and header.scan_number == scan.number:
            self._forward(header, parts)
            return
        verdict = self._admit(header, parts)
        if verdict is Verdict.BEGUN:
            self._forward(header, parts)
        elif verdict is Verdict.REFUSED:
            self.admission.count_refused(header.scan_number)
        elif verdict is Verdict.LATE:
            self.admission.count_late(header.scan_number)

    def _admit(self, header: SectorHeader, parts: list | None) -> Verdict:
        """What a sector of another scan than the open one does (parts None: a forwarder holds it): a new
        scan supersedes the open one and begins now (BEGUN) or once every node is armed (HELD)."""
        verdict = self.admission.decide(header, self._scan, parts)
        if verdict is not Verdict.NEW:
            return verdict
        if self._scan is not None:
            self._end_scan(EndReason.SUPERSEDED)
        if not self.admission.armed():
            self.admission.hold(header, parts)  # begins when every node is armed again
            return Verdict.HELD
        self._begin_scan(header)
        return Verdict.BEGUN

    def _forward(self, header: SectorHeader, parts: list) -> None:
        scan = self._scan
        assert scan is not None
        scan.add(header)
        self.stats.received += 1
        index = self.path.route(header.frame_number)
        node = self.nodes.by_index[index] if index is not None else None
        if node is not None and self.path.send(node.index, [p.DATA, *parts]):
            scan.sent[node.index] += 1
            self.stats.forwarded += 1
            self.stats.per_node[node.name] = self.stats.per_node.get(node.name, 0) + 1
        else:
            scan.unroutable += 1
            self.stats.unroutable += 1
        scan.last_sector = time.monotonic()  # after the send: time blocked on a full node is not silence
        if scan.complete:
            self._end_scan(EndReason.COMPLETE)

    def _maybe_begin_held(self) -> None:
        held = self.admission.take_held() if self._scan is None else None
        if held is not None:
            header, parts = held
            self._begin_scan(header)
            if parts is not None:
                self._forward(header, parts)
        for parts in self.admission.take_replay(self._scan):  # a superseding scan's first, kept sectors
            self._on_message(parts)

    def _begin_scan(self, header: SectorHeader) -> None:
        self.stats.scans += 1
        scan = OpenScan(header, self.n_nodes, time.monotonic(), f"{self.session_id:08x}-{self.stats.scans}")
        self._scan = scan
        self.nodes.disarm()
        plan = scan.plan(self.session_id, self.path.routes)
        if self.forwarding is not None:
            self.forwarding.tell(plan)
        self.path.begin(plan)
        scan.log_begin(self.n_nodes)
        self._say_lost()  # a node found gone while the begin went out: after the begin, to the rest
        self._publish_state()

    def _end_scan(self, reason: EndReason) -> None:
        scan = self._scan
        assert scan is not None
        self._scan = None
        self.path.ended.add(scan.number, time.monotonic())
        end = scan.end(reason)
        forwarders = self.hub.alive_indices() if self.hub is not None else []
        self.path.end(end, lambda index, _: scan.sent[index], forwarders)
        if self.forwarding is not None:
            self.forwarding.tell(end)
        self.stats.ended.append(scan.record(end))
        self._publish_state()

    # ------------------------------------------------------------------------------------------ forwarders
    def _service_hub(self) -> None:
        assert self.forwarding is not None
        for message in self.forwarding.receive():
            if isinstance(message, f.Progress):
                if self.forwarding.merge(message, self._scan):
                    self._end_scan(EndReason.COMPLETE)
            elif isinstance(message, f.Seen):
                self._on_seen(message)

    def _on_seen(self, seen: f.Seen) -> None:
        """A forwarder holds the first sector of a scan it has no word on: begin it, or say why not."""
        assert self.forwarding is not None
        header = self.forwarding.seen_header(seen)
        if header is None:
            return
        scan = self._scan
        if scan is not None and header.scan_number == scan.number:
            self.forwarding.tell(scan.plan(self.session_id, self.path.routes))  # it began meanwhile
            return
        verdict = self._admit(header, None)
        if verdict is Verdict.REFUSED or verdict is Verdict.LATE:
            self.forwarding.tell(f.Drop(scan_number=header.scan_number, why=verdict))

    # ------------------------------------------------------------------------------------------ nodes
    def _send_failed(self, index: int, outcome: Sent) -> None:
        self.control.send_failed(index, outcome)

    def _wait_for_room(self) -> None:
        if self.sockets.control_poller.poll(_BLOCKED_POLL_MS):
            self.control.service()
        if time.monotonic() >= self._next_state:
            self._publish_state()

    def _joined(self, node: NodeEntry) -> None:
        if self._scan is not None:  # a node restarted mid-scan: tell it what the data that follows is
            self.path.begin(self._scan.plan(self.session_id, self.path.routes), only=node.index)

    def _lost(self, name: str) -> None:
        if self._scan is not None:
            self._scan.lost.add(name)  # the writer must not wait for it
            self._lost_unsaid = True  # said once the routes no longer hold it (_say_lost)

    def _say_lost(self) -> None:
        """Tell the open scan's nodes at once which nodes it lost (p.NodesLost says why not only at its end)."""
        if self._lost_unsaid and self._scan is not None and self._scan.lost:
            self.path.tell_all(self._scan.lost_message())
        self._lost_unsaid = False

    # ------------------------------------------------------------------------------------------ monitor
    def state(self) -> p.AggregatorState:
        """A snapshot for monitors; safe to call from another thread (tests, an embedding process)."""
        lost = self.hub.lost if self.hub is not None else None
        return monitor_state(self.nodes, self.stats, self._scan, self._stopping, lost)

    def _publish_state(self) -> None:
        self._next_state = time.monotonic() + self.heartbeat
        if self._monitor is not None:
            self._monitor.send_multipart(p.encode(self.state()))

    # ------------------------------------------------------------------------------------------ stop
    def _shutdown(self) -> None:
        """End an open scan (reason "shutdown"), say bye to every node, publish the final state."""
        self._stopping = True
        if self._scan is not None:
            self._end_scan(EndReason.SHUTDOWN)
        for node in self.nodes.by_index.values():
            if node.connected:
                self.control.reply(node.identity, p.Bye(reason="shutdown"))
        if self._monitor is not None:
            self._publish_state()
        self.stats.log_stopped()


def run_aggregator(
    settings: AggregatorConfig | StreamingSettings,
    curve: CurveServerConfig | None = None,
    stop_event: threading.Event | None = None,
    timeout: float | None = None,
) -> AggregatorStats:
    """Run an aggregator until SIGTERM/SIGINT, stop_event, or timeout seconds; returns its counters."""
    stop = stop_event or threading.Event()
    with stop_on_signals(stop.set, grace=STOP_GRACE_S), Aggregator(settings, curve) as agg:
        return agg.run(stop_event=stop, timeout=timeout)
