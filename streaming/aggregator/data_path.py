"""One data path, as path 0 (the aggregator) and path i (forwarding process i, streaming.aggregator.forwarder)
both run it: its receiver PULLs and node ROUTER bound at port + i x ``aggregator_port_stride``, the routes
(the connected nodes), the routed send that waits for room, the memory of ended scans (late sectors), and
each node's ``scan`` and ``end`` on this path's connection.

Like streaming.transport.router_io, it takes its owner's decisions as callables (``identity``, ``stop``,
``wait``, ``failed``), so the aggregator and a forwarder share the code without sharing state: what a lost
node means is the owner's business.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from streaming.protocol import control as p
from streaming.protocol import paths as f
from streaming.protocol.sector import MAX_MESSAGE_BYTES
from streaming.settings import StreamingSettings
from streaming.transport.addresses import offset_address
from streaming.transport.router_io import Sent, send_waiting
from streaming.transport.security import CurveServerConfig, apply_server

LINGER_MS = 1000
ENDED_MEMORY = 1024  # ended scans remembered (late sectors are recognised by their scan number)


@dataclass(frozen=True)
class PathConfig:
    """What a data path takes from the streaming settings."""

    receivers: tuple[str, ...]
    nodes_bind: str
    port_stride: int
    receiver_hwm: int
    node_hwm: int
    stall_timeout: float
    scan_deadline: float
    max_scan_positions: int  # a scan announcing more positions is refused (streaming.max_scan_positions)
    n_nodes: int  # the session's node slots: frame f's home is node f % n_nodes (protocol.route_live)

    @classmethod
    def of(cls, st: StreamingSettings) -> PathConfig:
        """The data path's part of the settings."""
        return cls(
            receivers=tuple(st.receivers),
            nodes_bind=st.nodes_bind,
            port_stride=st.aggregator_port_stride,
            receiver_hwm=st.aggregator_receiver_hwm,
            node_hwm=st.aggregator_node_hwm,
            stall_timeout=st.aggregator_stall_timeout,
            scan_deadline=st.scan_deadline,
            max_scan_positions=st.max_scan_positions,
            n_nodes=st.n_nodes,
        )


class PathSockets:
    """Path i's sockets: one PULL per receiver address and the ROUTER the nodes connect to (CURVE when keys
    are given), bound at port + i x stride at construction (port 0: any free port, known at once)."""

    def __init__(
        self, config: PathConfig, index: int, context: zmq.Context, curve: CurveServerConfig | None
    ) -> None:
        self.context = context
        self.auth = None
        self._all: list[zmq.Socket] = []
        delta = index * config.port_stride
        try:
            self.receivers = []
            for address in config.receivers:
                sock = self.socket(zmq.PULL)
                sock.rcvhwm = config.receiver_hwm
                sock.maxmsgsize = MAX_MESSAGE_BYTES  # queued memory: hwm x connections x this, at most
                sock.bind(offset_address(address, delta))
                self.receivers.append(sock)
            self.router = self.socket(zmq.ROUTER)
            self.router.router_mandatory = 1  # a vanished node is an error, not a silent drop
            self.router.router_handover = 1  # a reconnect with the same identity takes over
            self.router.sndhwm = config.node_hwm
            self.router.maxmsgsize = MAX_MESSAGE_BYTES  # the nodes send only control messages here
            if curve is not None:
                self.auth = apply_server(self.router, curve, context)
            self.router.bind(offset_address(config.nodes_bind, delta))
        except BaseException:
            self.close()
            raise
        self.receiver_endpoints = [endpoint(s) for s in self.receivers]
        self.nodes_endpoint = endpoint(self.router)

    def socket(self, kind: int) -> zmq.Socket:
        """A socket of this context with a bounded linger, closed with the others."""
        sock = self.context.socket(kind)
        sock.linger = LINGER_MS
        self._all.append(sock)
        return sock

    def close(self) -> None:
        """Close every socket (bounded linger) and stop the CURVE authenticator; idempotent."""
        for sock in self._all:
            sock.close(linger=LINGER_MS)
        self._all = []
        if self.auth is not None:
            self.auth.stop()
            self.auth = None


class EndedScans:
    """Scans that ended lately: a sector of one that ended less than ``window`` seconds ago is late; after
    that the same number begins a new scan (the detector resets its scan numbers)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._ended: OrderedDict[int, float] = OrderedDict()  # scan number -> when it ended (monotonic)

    def add(self, number: int, now: float) -> None:
        """A scan ended now (only the latest ENDED_MEMORY are kept)."""
        self._ended.pop(number, None)
        self._ended[number] = now
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)

    def discard(self, number: int) -> None:
        """The number begins a new scan."""
        self._ended.pop(number, None)

    def is_late(self, number: int, now: float) -> bool:
        """A sector of this scan number now is late."""
        ended = self._ended.get(number)
        if ended is None:
            return False
        if now - ended < self.window:
            return True
        del self._ended[number]
        return False


class DataPath:
    """Routes, sends, and tells the nodes a scan's begin and end on one path; see the module docstring.

    identity(index): the node's current connection on this path (None: gone); stop(): the owner is
    stopping; wait(): block briefly while a node's queue is full (may service control input);
    failed(index, outcome): a send ended UNREACHABLE or STALLED.
    """

    def __init__(
        self,
        sockets: PathSockets,
        index: int,
        config: PathConfig,
        *,
        identity: Callable[[int], bytes | None],
        stop: Callable[[], bool],
        wait: Callable[[], None],
        failed: Callable[[int, Sent], None],
    ) -> None:
        self.router, self.index = sockets.router, index
        self.stall_timeout = config.stall_timeout
        self._identity, self._stop, self._wait, self._failed = identity, stop, wait, failed
        self.routes: list[tuple[int, str]] = []  # the connected nodes, (index, name), in index order
        self.live: list[int] = []  # their indices, in order
        self.names: dict[int, str] = {}
        self.n_nodes = config.n_nodes
        self._home_live = [False] * config.n_nodes  # by index: connected (frames keep their home node)
        self.ended = EndedScans(config.scan_deadline)

    def set_routes(self, routes: list) -> None:
        """Route over these nodes ([index, name] pairs) from now on."""
        self.routes = [(int(i), str(n)) for i, n in routes]
        self.live = [i for i, _ in self.routes]
        self.names = dict(self.routes)
        self._home_live = [i in self.names for i in range(self.n_nodes)]

    def route(self, frame_number: int) -> int | None:
        """The node index a frame's sectors go to (None: no node is connected); see protocol.route_live."""
        if not self.live:
            return None
        home = frame_number % self.n_nodes
        if self._home_live[home]:
            return home
        return p.route_live(frame_number, self.live, self.n_nodes)

    def send(self, index: int, parts: list) -> bool:
        """Send [identity, *parts] to node ``index`` zero-copy, waiting while its queue is full (up to the
        stall timeout); False when not delivered (``failed`` has been told why, unless stopping)."""
        outcome = send_waiting(
            self.router, self._identity, index, parts, self.stall_timeout, self._stop, self._wait
        )
        if outcome is Sent.SENT:
            return True
        if outcome is not Sent.STOPPED:
            self._failed(index, outcome)
        return False

    def send_control(self, index: int, message: object) -> None:
        """A control message to a connected node (nothing to one that is gone)."""
        if self._identity(index) is not None:
            self.send(index, p.encode(message))

    def tell_all(self, message: object) -> None:
        """The same control message to every routed node."""
        for index, _ in list(self.routes):
            self.send_control(index, message)

    def begin(self, plan: f.Begin, only: int | None = None) -> None:
        """Tell every routed node (or node ``only``) that the scan of ``plan`` begins."""
        for index, _ in list(self.routes):
            if only is None or index == only:
                self.send_control(index, scan_begin(plan, index))

    def end(self, end: f.End, sent: Callable[[int, str], int], forwarders: list[int]) -> None:
        """Tell every routed node the scan ended, with what this path sent it (``sent(index, name)``); the
        aggregator's end names the forwarders whose end follows."""
        for index, name in list(self.routes):
            message = p.ScanEnd(
                scan_number=end.scan_number,
                sectors_sent=sent(index, name),
                reason=end.reason,
                sectors_expected=end.expected,
                sectors_received=end.received,
                malformed=end.malformed,
                path=self.index,
                forwarders=forwarders,
                lost=list(end.lost),
            )
            self.send_control(index, message)


def weak(method: Callable[..., Any]) -> Callable[..., Any]:
    """A bound method called through a weak reference (None once its object is gone): a part that calls
    back into its owner then makes no reference cycle, so the owner's sockets and context are freed by
    reference counting, never left to the garbage collector, whose finalizer order can hang term()."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        return None if bound is None else bound(*args)

    return call


def scan_begin(plan: f.Begin, index: int) -> p.ScanBegin:
    """Node ``index``'s ``scan`` for a plan."""
    return p.ScanBegin(
        scan_number=plan.scan_number,
        scan_width=plan.scan_width,
        scan_height=plan.scan_height,
        expected_frames=plan.expected_frames,
        node_index=index,
        n_nodes=plan.n_nodes,
        session_id=plan.session_id,
        scan_key=plan.key,
    )


def endpoint(sock: zmq.Socket) -> str:
    """The address a socket is bound to (the real port when bound to port 0)."""
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()
