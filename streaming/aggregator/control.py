"""The aggregator's conversation with its nodes (the control messages of streaming.protocol.control): hello and
welcome (roles from the node registry), ready, writer address, done, heartbeats; and losing a node (gone,
stalled or silent), which changes the routes here and in every forwarding process."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import suppress

import zmq

from streaming.aggregator.data_path import DataPath
from streaming.aggregator.forwarding import ForwardingControl
from streaming.aggregator.registry import NodeEntry, NodeRegistry
from streaming.protocol import control as p
from streaming.protocol import paths as f
from streaming.transport.ratelog import RateLimitedLog
from streaming.transport.router_io import Sent

log = logging.getLogger(__name__)

_CONTROL_BATCH = 64
_PROBE_INTERVAL = 0.2  # seconds between checks of one node's connection (another connection claims its name)


class NodeControl:
    """Answers the nodes' control messages on the aggregator's ROUTER.

    nodes: the registry it keeps; path: the aggregator's data path (its routes, and sends that wait for
    room); forwarding: the forwarding processes (None: none); joined(node): a node was welcomed (the
    aggregator tells it about an open scan); lost(name): a node was lost (the open scan notes it);
    publish(): the monitor's state changed.
    """

    def __init__(
        self,
        nodes: NodeRegistry,
        path: DataPath,
        forwarding: ForwardingControl | None,
        *,
        session_id: int,
        node_timeout: float,
        joined: Callable[[NodeEntry], None],
        lost: Callable[[str], None],
        publish: Callable[[], None],
    ) -> None:
        self.nodes, self.path, self.router, self.forwarding = nodes, path, path.router, forwarding
        self.session_id, self.node_timeout = session_id, node_timeout
        self._joined, self._lost, self._publish = joined, lost, publish
        self.malformed = 0  # control messages dropped: undecodable, or their handling failed
        self.refused = 0  # well-formed ones from a connection not entitled to them (never said hello, ...)
        self._log = RateLimitedLog(log)

    def service(self) -> None:
        """Handle the control messages waiting (a bounded batch); no message ends the aggregator."""
        for _ in range(_CONTROL_BATCH):
            try:
                parts = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._on_control(parts)
            except zmq.ContextTerminated:
                raise
            except Exception as exc:  # noqa: BLE001 - one message must not stop the aggregator
                self.malformed += 1
                self._log("control message dropped", "handling it failed: %s: %s", type(exc).__name__, exc)

    def _on_control(self, parts: list[bytes]) -> None:
        if len(parts) != 3:
            self.malformed += 1
            self._log("malformed control message dropped", "%d parts", len(parts))
            return
        identity, kind, body = parts
        try:
            message = p.decode(kind, body)
        except p.ProtocolError as exc:
            self.malformed += 1
            self._log("malformed control message dropped", "%s", exc)
            return
        name = getattr(message, "name", None)
        if isinstance(name, str) and identity not in self.nodes.by_identity:
            self._check_gone(name)
        if isinstance(message, p.Hello):
            self._on_hello(identity, message)
            return
        node = self.nodes.node_for(identity, getattr(message, "name", None))
        if node is None or getattr(message, "name", node.name) != node.name:
            # Never said hello, or speaks for another node (e.g. a WriterAt under the writer host's name).
            self.refused += 1
            self._log(
                "control message refused",
                "%s naming %r from a connection not bound to that node",
                type(message).__name__,
                getattr(message, "name", None),
            )
            return
        node.last_seen = time.monotonic()
        if node.index not in self.path.live:  # a node marked lost that talks again (a stall that cleared)
            self.routes_changed()
        if isinstance(message, p.Ready):
            node.ready = True
            log.debug("node %s ready", node.name)
            if self.nodes.all_ready():  # a session waiting for its nodes hears it now, not a heartbeat later
                self._publish()
        elif isinstance(message, p.WriterAt):
            if self.nodes.writer_at(node, message):
                for other in self.nodes.by_index.values():  # everyone learns the (new) writer address
                    self.welcome(other)
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

    def _check_gone(self, name: str) -> None:
        """Another connection speaks for node ``name``: if the node's own connection is gone (a restarted
        node, whose old connection the ROUTER has dropped), lose it now, so the new one may take its place;
        otherwise the name stays bound to it. The check repeats the node's welcome (nodes take a welcome
        again whenever the writer address changes), which ROUTER_MANDATORY refuses for a vanished peer."""
        node = self.nodes.by_name.get(name)
        now = time.monotonic()
        if node is None or not node.connected or now - node.probed < _PROBE_INTERVAL:
            return
        node.probed = now
        try:
            self.router.send_multipart([node.identity, *p.encode(self._welcome_of(node))], zmq.NOBLOCK)
        except zmq.Again:
            return  # its queue is full: it is there
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.lose(node, "disconnected (a new connection speaks for it)")

    def _on_hello(self, identity: bytes, hello: p.Hello) -> None:
        bye = self.nodes.refusal(hello, identity)
        if bye is not None:
            self.refused += 1
            self._log("hello refused", "node %r (pid %d): %s", hello.name, hello.pid, bye.reason)
            self.reply(identity, bye)
            return
        rejoin = hello.name in self.nodes.by_name
        node = self.nodes.join(identity, hello)
        node.last_seen = time.monotonic()
        log.info(
            "node %s (pid %d) %s as index %d",
            hello.name,
            hello.pid,
            "rejoined" if rejoin else "joined",
            node.index,
        )
        self.nodes.designate_writer(node)
        self.routes_changed()
        self.welcome(node)
        self._joined(node)
        self._publish()

    def welcome(self, node: NodeEntry) -> None:
        """Tell a node its index, whether it hosts the writer, and the writer's address once known."""
        self.path.send_control(node.index, self._welcome_of(node))

    def _welcome_of(self, node: NodeEntry) -> p.Welcome:
        w = self.nodes.writer
        return p.Welcome(
            node_index=node.index,
            n_nodes=self.nodes.n_nodes,
            session_id=self.session_id,
            host_writer=self.nodes.hosts_writer(node),
            writer=w.address if w is not None else "",
            data_ports=self.forwarding.hub.data_ports if self.forwarding is not None else [],
        )

    def reply(self, identity: bytes, message: object) -> None:
        """A message to a connection that may not be a node (yet), never waiting."""
        with suppress(zmq.ZMQError):  # a refused or vanished peer that cannot even take a bye
            self.router.send_multipart([identity, *p.encode(message)], zmq.NOBLOCK)

    def check_liveness(self, now: float) -> None:
        """A node silent for node_timeout (no heartbeat) is lost: its place is free for a restarted one."""
        for node in list(self.nodes.by_index.values()):
            if node.connected and now - node.last_seen > self.node_timeout:
                self.lose(node, f"silent for {self.node_timeout:g} s (no heartbeat)")
        if self.forwarding is not None:
            self.forwarding.hub.alive_indices()  # logs a forwarding process that died

    def send_failed(self, index: int, outcome: Sent) -> None:
        """A node gone (EHOSTUNREACH) or stalled past the stall timeout is marked disconnected; its sectors
        count as unroutable until it talks to us again."""
        node = self.nodes.by_index[index]
        if outcome is Sent.UNREACHABLE:
            self.lose(node, "disconnected")
        elif outcome is Sent.STALLED:
            self.lose(node, f"stalled: its queue stayed full for {self.path.stall_timeout:g} s")

    def lose(self, node: NodeEntry, why: str) -> None:
        """Take a node out of the routes (its frames in flight are lost; later ones go to the others)."""
        if node.connected:
            rest = len(self.path.live) - 1
            log.warning(
                "node %s (index %d) %s; its frames in flight are lost, %s",
                node.name,
                node.index,
                why,
                f"later frames go to the {rest} other node(s)" if rest else "no node is left",
            )
            self._lost(node.name)
        self.nodes.lose(node)
        self.routes_changed()
        self._publish()

    def routes_changed(self) -> None:
        """Route over the connected nodes from now on, here and in every forwarding process."""
        routes = self.nodes.routes()
        self.path.set_routes(routes)
        if self.forwarding is not None:
            self.forwarding.tell(f.Routes(routes=[list(r) for r in routes]))
