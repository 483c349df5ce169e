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
and dropped. See streaming.protocol for the messages.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import zmq

from counting.geometry import N_SECTORS
from streaming import protocol as p
from streaming.security import CurveServerConfig, apply_server
from streaming.wire import SectorHeader, WireError, decode_message

log = logging.getLogger(__name__)

NODE_SNDHWM = 2000  # messages queued per node before the aggregator blocks (about 330 MB of sectors)
RECEIVER_RCVHWM = 1000  # messages queued per receiver connection before it stops reading (about 166 MB)
_DRAIN_BATCH = 256  # sectors taken from one receiver before looking at control messages and timers
_CONTROL_BATCH = 64
_BLOCKED_POLL_MS = 2  # while a node's queue is full: how long to wait between send attempts
_MAX_POLL_MS = 100
_ENDED_MEMORY = 1024  # ended scan numbers remembered, to recognise late sectors
_LINGER_MS = 1000
# Plain ints: pyzmq's enum flag arithmetic costs more per message than the send itself.
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


@dataclass
class AggregatorStats:
    """Running counters (whole session)."""

    received: int = 0  # valid sectors received
    forwarded: int = 0  # sectors sent to a node
    malformed: int = 0  # messages that failed validation
    unroutable: int = 0  # sectors whose node was gone or stalled
    late: int = 0  # sectors of an already-ended scan
    scans: int = 0  # scans begun
    per_node: dict[str, int] = field(default_factory=dict)  # sectors forwarded, by node name
    # One ScanEnd per ended scan (sectors_sent: all nodes together), the latest _ENDED_MEMORY of them.
    ended: deque[p.ScanEnd] = field(default_factory=lambda: deque(maxlen=_ENDED_MEMORY), repr=False)


@dataclass
class _Node:
    name: str
    index: int
    identity: bytes
    connected: bool = True
    ready: bool = False
    last_seen: float = 0.0


class _Scan:
    """Bookkeeping of the open scan: expected counts from the headers, what arrived, what went where."""

    def __init__(self, header: SectorHeader, n_nodes: int, now: float) -> None:
        self.number = header.scan_number
        self.width = header.scan_width
        self.height = header.scan_height
        self.started = now
        self.last_sector = now
        self.threads: dict[tuple[int, int], int] = {}  # (module, thread_id) -> frames_this_thread
        self.module_expected = [0] * N_SECTORS
        self.module_received = [0] * N_SECTORS
        self.modules_done: set[int] = set()
        self.received = 0
        self.malformed = 0
        self.unroutable = 0
        self.sent = [0] * n_nodes
        # Frames in the whole scan as far as the first header tells: exact with one thread per receiver.
        self.expected_frames = max(header.frames_this_thread, self.width * self.height)

    def add(self, header: SectorHeader) -> None:
        """Count a sector of this scan."""
        m = header.module
        key = (m, header.thread_id)
        if key not in self.threads:
            self.threads[key] = header.frames_this_thread
            self._update_expected(m)
        self.received += 1
        self.module_received[m] += 1
        if self.module_received[m] >= self.module_expected[m]:
            self.modules_done.add(m)

    def _update_expected(self, module: int) -> None:
        counts = [n for (m, _), n in self.threads.items() if m == module]
        # A receiver that does not know its count sends 0: assume one frame per scan position.
        self.module_expected[module] = self.width * self.height if 0 in counts else sum(counts)
        if self.module_received[module] < self.module_expected[module]:
            self.modules_done.discard(module)

    @property
    def complete(self) -> bool:
        """All four modules seen and each sent all its threads announced."""
        return len(self.modules_done) == N_SECTORS

    @property
    def sectors_expected(self) -> int:
        """Sum over modules; a module never seen is assumed to send as much as the largest seen."""
        seen = [e for m, e in enumerate(self.module_expected) if any(k[0] == m for k in self.threads)]
        return sum(seen) + (N_SECTORS - len(seen)) * max(seen, default=self.width * self.height)


class Aggregator:
    """Receives sectors, forwards frames to nodes, ends scans; see the module docstring.

    receivers: addresses to bind PULL sockets on (e.g. 4 of them, one per module; port 0 picks a free
    port, see receiver_endpoints). nodes_bind: ROUTER address the nodes connect to. n_nodes: how many
    nodes share each scan. monitor_bind: PUB address for monitors (None: no monitor socket).
    scan_deadline: seconds without a sector of the open scan before it ends with reason "deadline".
    heartbeat: seconds between state messages on the monitor. curve: CURVE server keys and allowed
    client keys for the node and monitor sockets (None: plain, for localhost). stall_timeout: seconds a
    node's full queue may block forwarding before that node is marked stalled (its sectors then count as
    unroutable until it talks again). node_sndhwm, receiver_rcvhwm: messages queued per node and per
    receiver connection (each sector ~166 kB: together they bound this process's memory). context: a
    zmq.Context to use (default: a private one).
    """

    def __init__(
        self,
        receivers: Sequence[str],
        nodes_bind: str,
        n_nodes: int,
        monitor_bind: str | None = None,
        scan_deadline: float = 2.0,
        heartbeat: float = 1.0,
        curve: CurveServerConfig | None = None,
        *,
        stall_timeout: float = 30.0,
        node_sndhwm: int = NODE_SNDHWM,
        receiver_rcvhwm: int = RECEIVER_RCVHWM,
        context: zmq.Context | None = None,
    ) -> None:
        if n_nodes < 1:
            raise ValueError(f"n_nodes must be >= 1, got {n_nodes}")
        if not receivers:
            raise ValueError("give at least one receiver address")
        if scan_deadline <= 0 or heartbeat <= 0 or stall_timeout <= 0:
            raise ValueError("scan_deadline, heartbeat and stall_timeout must be > 0")
        if node_sndhwm < 1 or receiver_rcvhwm < 1:
            raise ValueError("node_sndhwm and receiver_rcvhwm must be >= 1 (0 would mean unbounded memory)")
        self.n_nodes = n_nodes
        self.scan_deadline = scan_deadline
        self.heartbeat = heartbeat
        self.stall_timeout = stall_timeout
        self.session_id = int.from_bytes(os.urandom(4), "little")
        self.security = (
            f"CURVE, {len(curve.allowed_clients)} allowed client key(s)"
            if curve is not None
            else "plain (no CURVE: for loopback or a trusted network only)"
        )
        self.stats = AggregatorStats()
        self._own_ctx = context is None
        self._ctx = zmq.Context() if context is None else context
        self._auth = None
        self._nodes: dict[bytes, _Node] = {}  # by current identity
        self._by_name: dict[str, _Node] = {}
        self._by_index: dict[int, _Node] = {}
        self._scan: _Scan | None = None
        self._held: tuple[SectorHeader, list] | None = None  # first sector of a scan waiting for the arm
        self._ended: OrderedDict[int, None] = OrderedDict()
        self._next_state = 0.0
        self._stopping = False
        self._stop_event: threading.Event | None = None
        self._until: Callable[[AggregatorStats], bool] | None = None
        self._end: float | None = None
        self._sockets: list[zmq.Socket] = []
        try:
            self._bind(receivers, nodes_bind, monitor_bind, curve, node_sndhwm, receiver_rcvhwm)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ set-up
    def _bind(
        self,
        receivers: Sequence[str],
        nodes_bind: str,
        monitor_bind: str | None,
        curve: CurveServerConfig | None,
        node_sndhwm: int,
        receiver_rcvhwm: int,
    ) -> None:
        self._receivers = []
        for address in receivers:
            sock = self._socket(zmq.PULL)
            sock.rcvhwm = receiver_rcvhwm
            sock.bind(address)
            self._receivers.append(sock)
        self._router = self._socket(zmq.ROUTER)
        self._router.router_mandatory = 1
        self._router.router_handover = 1
        self._router.sndhwm = node_sndhwm
        if curve is not None:
            self._auth = apply_server(self._router, curve, self._ctx)
        self._router.bind(nodes_bind)
        self._monitor = None
        if monitor_bind is not None:
            self._monitor = self._socket(zmq.PUB)
            if curve is not None:
                apply_server(self._monitor, curve, self._ctx, self._auth)
            self._monitor.bind(monitor_bind)
        self._control_poller = zmq.Poller()
        self._control_poller.register(self._router, zmq.POLLIN)
        self._data_poller = zmq.Poller()
        self._data_poller.register(self._router, zmq.POLLIN)
        for sock in self._receivers:
            self._data_poller.register(sock, zmq.POLLIN)
        # Read once: the real ports (bound to port 0) stay known after the sockets are closed.
        self._endpoints = {
            "receivers": [_endpoint(s) for s in self._receivers],
            "nodes": _endpoint(self._router),
            "monitor": None if self._monitor is None else _endpoint(self._monitor),
        }

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.linger = _LINGER_MS
        self._sockets.append(sock)
        return sock

    @property
    def receiver_endpoints(self) -> list[str]:
        """The bound receiver addresses (real ports when bound to port 0)."""
        return list(self._endpoints["receivers"])

    @property
    def nodes_endpoint(self) -> str:
        """The bound node ROUTER address."""
        return self._endpoints["nodes"]

    @property
    def monitor_endpoint(self) -> str | None:
        """The bound monitor PUB address, if any."""
        return self._endpoints["monitor"]

    def __enter__(self) -> Aggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the sockets (bounded linger) and stop the CURVE authenticator; idempotent."""
        for sock in self._sockets:
            sock.close(linger=_LINGER_MS)
        self._sockets = []
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_ctx and not self._ctx.closed:
            self._ctx.term()

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
        log.info(
            "aggregator: receivers %s, nodes %s (%d), monitor %s; node and monitor sockets %s",
            self.receiver_endpoints,
            self.nodes_endpoint,
            self.n_nodes,
            self.monitor_endpoint,
            self.security,
        )
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
        """One poll: control messages, then sectors (only when armed or streaming), then timers."""
        self._maybe_begin_held()
        streaming = self._scan is not None or (self._held is None and self._all_ready())
        poller = self._data_poller if streaming else self._control_poller
        events = dict(poller.poll(self._poll_ms()))
        if self._router in events:
            self._service_control()
        if streaming:
            for sock in self._receivers:
                if sock in events:
                    self._drain(sock)
        now = time.monotonic()
        scan = self._scan
        if scan is not None and now - scan.last_sector >= self.scan_deadline:
            self._end_scan("deadline")
        if now >= self._next_state:
            self._publish_state()

    def _poll_ms(self) -> int:
        now = time.monotonic()
        wait = min(self._next_state - now, _MAX_POLL_MS / 1000)
        if self._scan is not None:
            wait = min(wait, self._scan.last_sector + self.scan_deadline - now)
        return max(0, int(wait * 1000) + 1)

    def _drain(self, sock: zmq.Socket) -> None:
        """Take up to a batch of messages from one receiver without blocking."""
        for _ in range(_DRAIN_BATCH):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_message(parts)
            if self._held is not None:
                return  # a new scan waits for the arm: stop taking data

    # ------------------------------------------------------------------------------------------ data
    def _on_message(self, parts: list) -> None:
        try:
            header, _ = decode_message(parts)
        except WireError as exc:
            self._on_malformed(exc)
            return
        scan = self._scan
        if scan is None or header.scan_number != scan.number:
            if header.scan_number in self._ended:
                self.stats.late += 1
                if self.stats.late & (self.stats.late - 1) == 0:  # powers of two: never a log flood
                    log.warning(
                        "late sector #%d dropped: scan %d already ended (a new scan needs a new scan number)",
                        self.stats.late,
                        header.scan_number,
                    )
                return
            if scan is not None:
                self._end_scan("superseded")
            if not self._all_ready():
                self._held = (header, parts)  # begins when every node is armed again
                return
            self._begin_scan(header)
        self._forward(header, parts)

    def _on_malformed(self, exc: WireError) -> None:
        self.stats.malformed += 1
        if self._scan is not None:
            self._scan.malformed += 1
        # One line per power of two, so a flood of garbage cannot flood the log.
        if self.stats.malformed & (self.stats.malformed - 1) == 0:
            log.warning("malformed sector message #%d dropped: %s", self.stats.malformed, exc)

    def _forward(self, header: SectorHeader, parts: list) -> None:
        scan = self._scan
        assert scan is not None
        scan.add(header)
        self.stats.received += 1
        index = p.route(header.frame_number, self.n_nodes)
        node = self._by_index.get(index)
        if node is not None and self._send(node, [p.DATA, *parts]):
            scan.sent[index] += 1
            self.stats.forwarded += 1
            self.stats.per_node[node.name] = self.stats.per_node.get(node.name, 0) + 1
        else:
            scan.unroutable += 1
            self.stats.unroutable += 1
        scan.last_sector = time.monotonic()  # after the send: time blocked on a full node is not silence
        if scan.complete:
            self._end_scan("complete")

    def _maybe_begin_held(self) -> None:
        if self._held is not None and self._scan is None and self._all_ready():
            header, parts = self._held
            self._held = None
            self._begin_scan(header)
            self._forward(header, parts)

    def _begin_scan(self, header: SectorHeader) -> None:
        scan = _Scan(header, self.n_nodes, time.monotonic())
        self._scan = scan
        self.stats.scans += 1
        for node in self._by_index.values():
            node.ready = False  # the arm is used up: each node re-arms after its done
        for node in self._by_index.values():
            self._send_control(node, self._scan_begin(scan, node))
        log.info(
            "scan %d begins: %dx%d, ~%d frames, %d nodes",
            scan.number,
            scan.width,
            scan.height,
            scan.expected_frames,
            self.n_nodes,
        )
        self._publish_state()

    def _scan_begin(self, scan: _Scan, node: _Node) -> p.ScanBegin:
        return p.ScanBegin(
            scan.number,
            scan.width,
            scan.height,
            scan.expected_frames,
            node.index,
            self.n_nodes,
            self.session_id,
        )

    def _end_scan(self, reason: str) -> None:
        scan = self._scan
        assert scan is not None
        self._scan = None
        self._ended[scan.number] = None
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)
        expected = scan.sectors_expected
        for index, node in sorted(self._by_index.items()):
            end = p.ScanEnd(scan.number, scan.sent[index], reason, expected, scan.received, scan.malformed)
            self._send_control(node, end)
        self.stats.ended.append(
            p.ScanEnd(scan.number, sum(scan.sent), reason, expected, scan.received, scan.malformed)
        )
        log.info(
            "scan %d ends (%s) after %.2f s: %d of %d sectors received, sent per node %s, "
            "%d unroutable, %d malformed",
            scan.number,
            reason,
            time.monotonic() - scan.started,
            scan.received,
            expected,
            scan.sent,
            scan.unroutable,
            scan.malformed,
        )
        self._publish_state()

    # ------------------------------------------------------------------------------------------ sending
    def _send(self, node: _Node, parts: list) -> bool:
        """Send [node identity, *parts] zero-copy; block while its queue is full (servicing control).

        False when the node is gone (EHOSTUNREACH) or stalled past stall_timeout: it is then marked
        disconnected, and its sectors count as unroutable until it talks to us again.
        """
        start = time.monotonic()
        while node.connected:
            identity = node.identity  # may change while we wait: a node can reconnect meanwhile
            try:
                self._send_parts(identity, parts)
                return True
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                if node.identity == identity:
                    self._lose(node, "disconnected")
                continue
            if self._stop_requested() or time.monotonic() - start >= self.stall_timeout:
                self._lose(node, f"stalled: its queue stayed full for {self.stall_timeout:g} s")
                return False
            # ROUTER's POLLOUT means "some peer has room", so wait on control input for a moment instead.
            if self._control_poller.poll(_BLOCKED_POLL_MS):
                self._service_control()
            if time.monotonic() >= self._next_state:
                self._publish_state()
        return False

    def _send_parts(self, identity: bytes, parts: list) -> None:
        """[identity, *parts], zero-copy, without blocking. Only the identity part can fail (Again: the
        node's queue is full; EHOSTUNREACH: no such peer); once it is accepted the rest always is."""
        router = self._router
        router.send(identity, _MORE, copy=False)
        for part in parts[:-1]:
            router.send(part, _MORE, copy=False)
        router.send(parts[-1], _LAST, copy=False)

    def _send_control(self, node: _Node, message: object) -> None:
        if node.connected:
            self._send(node, p.encode(message))

    def _lose(self, node: _Node, why: str) -> None:
        if node.connected:
            log.warning("node %s (index %d) %s; its sectors are dropped", node.name, node.index, why)
        node.connected = False
        node.ready = False
        self._publish_state()

    # ------------------------------------------------------------------------------------------ control
    def _service_control(self) -> None:
        for _ in range(_CONTROL_BATCH):
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_control(parts)

    def _on_control(self, parts: list[bytes]) -> None:
        if len(parts) != 3:
            log.warning("control message with %d parts ignored", len(parts))
            return
        identity, kind, body = parts
        try:
            message = p.decode(kind, body)
        except p.ProtocolError as exc:
            log.warning("bad control message ignored: %s", exc)
            return
        if isinstance(message, p.Hello):
            self._on_hello(identity, message)
            return
        node = self._node_for(identity, getattr(message, "name", None))
        if node is None:
            log.warning("%s from an unknown node ignored (it must say hello first)", type(message).__name__)
            return
        node.last_seen = time.monotonic()
        if isinstance(message, p.Ready):
            node.ready = True
            log.debug("node %s ready", node.name)
        elif isinstance(message, p.Done):
            log.info(
                "node %s done with scan %d: %d sectors, %d frames (%d incomplete), %s",
                node.name,
                message.scan_number,
                message.sectors,
                message.frames,
                message.incomplete_frames,
                message.reason,
            )
        elif not isinstance(message, p.Heartbeat):
            log.warning("unexpected %s from node %s ignored", type(message).__name__, node.name)

    def _on_hello(self, identity: bytes, hello: p.Hello) -> None:
        if hello.protocol != p.PROTOCOL_VERSION:
            log.warning(
                "node %s speaks protocol %d, not %d: refused", hello.name, hello.protocol, p.PROTOCOL_VERSION
            )
            self._reply(identity, p.Bye(f"protocol {p.PROTOCOL_VERSION} required"))
            return
        node = self._by_name.get(hello.name)
        if node is None:
            free = [i for i in range(self.n_nodes) if i not in self._by_index]
            if not free:
                log.warning("node %s refused: all %d node slots are taken", hello.name, self.n_nodes)
                self._reply(identity, p.Bye("all node slots are taken"))
                return
            node = _Node(hello.name, free[0], identity)
            self._by_name[node.name] = node
            self._by_index[node.index] = node
            log.info("node %s (pid %d) joined as index %d", node.name, hello.pid, node.index)
        else:
            log.info("node %s (pid %d) rejoined as index %d", node.name, hello.pid, node.index)
        self._rebind(node, identity)
        node.ready = False  # a (re)started node arms again with ready
        node.last_seen = time.monotonic()
        self._send_control(node, p.Welcome(node.index, self.n_nodes, self.session_id))
        if self._scan is not None:  # a node restarted mid-scan: tell it what the data that follows is
            self._send_control(node, self._scan_begin(self._scan, node))
        self._publish_state()

    def _node_for(self, identity: bytes, name: str | None) -> _Node | None:
        """The node behind an identity; a known name on a new identity is that node reconnected."""
        node = self._nodes.get(identity)
        if node is None and name is not None and name in self._by_name:
            node = self._by_name[name]
            self._rebind(node, identity)
        return node

    def _rebind(self, node: _Node, identity: bytes) -> None:
        if node.identity != identity:
            self._nodes.pop(node.identity, None)
            node.identity = identity
        self._nodes[identity] = node
        node.connected = True

    def _reply(self, identity: bytes, message: object) -> None:
        with suppress(zmq.ZMQError):  # a refused or vanished peer that cannot even take a bye
            self._router.send_multipart([identity, *p.encode(message)], zmq.NOBLOCK)

    def _all_ready(self) -> bool:
        nodes = self._by_index.values()
        return len(self._by_index) == self.n_nodes and all(n.connected and n.ready for n in nodes)

    # ------------------------------------------------------------------------------------------ monitor
    def state(self) -> p.AggregatorState:
        """A snapshot for monitors; safe to call from another thread (tests, an embedding process)."""
        # Copies first: list() and dict() of builtins run without releasing the GIL, so another thread
        # never sees a table the loop is changing.
        nodes = list(self._by_index.values())
        per_node = dict(self.stats.per_node)
        scan = self._scan
        all_ready = len(nodes) == self.n_nodes and all(n.connected and n.ready for n in nodes)
        if self._stopping:
            name = "stopped"
        elif scan is not None:
            name = "streaming"
        else:
            name = "armed" if all_ready else "waiting"
        s = self.stats
        return p.AggregatorState(
            state=name,
            scan_number=scan.number if scan is not None else -1,
            nodes_connected=sum(n.connected for n in nodes),
            nodes_ready=sum(n.connected and n.ready for n in nodes),
            n_nodes=self.n_nodes,
            received=s.received,
            forwarded=s.forwarded,
            malformed=s.malformed,
            unroutable=s.unroutable,
            per_node=per_node,
            time=time.time(),
            late=s.late,
        )

    def _publish_state(self) -> None:
        self._next_state = time.monotonic() + self.heartbeat
        if self._monitor is not None:
            self._monitor.send_multipart(p.encode(self.state()))

    # ------------------------------------------------------------------------------------------ stop
    def _shutdown(self) -> None:
        """End an open scan (reason "shutdown"), say bye to every node, publish the final state."""
        self._stopping = True
        if self._scan is not None:
            self._end_scan("shutdown")
        for node in self._by_index.values():
            if node.connected:
                self._reply(node.identity, p.Bye("shutdown"))
        if self._monitor is not None:
            self._publish_state()
        log.info(
            "aggregator stopped: %d received, %d forwarded, %d malformed, %d unroutable, %d late",
            self.stats.received,
            self.stats.forwarded,
            self.stats.malformed,
            self.stats.unroutable,
            self.stats.late,
        )


def _endpoint(sock: zmq.Socket) -> str:
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


@contextmanager
def _stop_on_signals(stop: threading.Event):
    """SIGTERM/SIGINT set the stop event (main thread only); the old handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_aggregator(
    receivers: Sequence[str],
    nodes_bind: str,
    n_nodes: int,
    monitor_bind: str | None = None,
    scan_deadline: float = 2.0,
    heartbeat: float = 1.0,
    curve: CurveServerConfig | None = None,
    stop_event: threading.Event | None = None,
    timeout: float | None = None,
    *,
    receiver_hwm: int = RECEIVER_RCVHWM,
    node_hwm: int = NODE_SNDHWM,
) -> AggregatorStats:
    """Run an aggregator until SIGTERM/SIGINT, stop_event, or timeout seconds; returns its counters.

    receivers: PULL addresses to bind, one per receiving server (e.g. tcp://*:6001..6004).
    nodes_bind: ROUTER address for the nodes (e.g. tcp://*:17000). n_nodes: nodes per scan.
    monitor_bind: PUB address for monitors (None: none). scan_deadline: seconds without a sector before
    an open scan ends. heartbeat: seconds between monitor states. curve: CURVE server config (None: plain).
    receiver_hwm, node_hwm: sectors queued per receiver connection and per node (the memory bound).
    """
    stop = stop_event or threading.Event()
    with (
        _stop_on_signals(stop),
        Aggregator(
            receivers,
            nodes_bind,
            n_nodes,
            monitor_bind,
            scan_deadline,
            heartbeat,
            curve,
            node_sndhwm=node_hwm,
            receiver_rcvhwm=receiver_hwm,
        ) as agg,
    ):
        return agg.run(stop_event=stop, timeout=timeout)
