"""The aggregator's conversation with its nodes (the control messages of streaming.protocol.control): hello and
welcome (roles from the node registry), ready, writer address, done, heartbeats. A part of Aggregator,
kept apart so each file reads in one sitting; it uses the aggregator's registry, sockets and routes."""

from __future__ import annotations

import logging
import time
from contextlib import suppress

import zmq

from streaming.aggregator.registry import NodeEntry
from streaming.protocol import control as p

log = logging.getLogger(__name__)

_CONTROL_BATCH = 64


class NodeControl:
    """Aggregator methods for the node control messages (mixed into Aggregator)."""

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
        node = self.nodes.node_for(identity, getattr(message, "name", None))
        if node is None:
            log.warning("%s from an unknown node ignored (it must say hello first)", type(message).__name__)
            return
        node.last_seen = time.monotonic()
        if node.index not in self._live:  # a node marked lost that talks again (a stall that cleared)
            self._routes_changed()
        if isinstance(message, p.Ready):
            node.ready = True
            log.debug("node %s ready", node.name)
        elif isinstance(message, p.WriterAt):
            if self.nodes.writer_at(node, message):
                for other in self.nodes.by_index.values():  # everyone learns the (new) writer address
                    self._welcome(other)
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
        bye = self.nodes.refusal(hello)
        if bye is not None:
            log.warning("node %s (pid %d) refused: %s", hello.name, hello.pid, bye.reason)
            self._reply(identity, bye)
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
        self._routes_changed()
        self._welcome(node)
        if self._scan is not None:  # a node restarted mid-scan: tell it what the data that follows is
            self._send_control(node, self._scan_begin(self._scan, node))
        self._publish_state()

    def _welcome(self, node: NodeEntry) -> None:
        """Tell a node its index, whether it hosts the writer, and the writer's address once known."""
        w = self.nodes.writer
        hosts = self.nodes.hosts_writer(node)
        address = w.address if w is not None else ""
        ports = self.hub.data_ports if self.hub is not None else []
        self._send_control(
            node, p.Welcome(node.index, self.n_nodes, self.session_id, hosts, address, data_ports=ports)
        )

    def _reply(self, identity: bytes, message: object) -> None:
        with suppress(zmq.ZMQError):  # a refused or vanished peer that cannot even take a bye
            self._router.send_multipart([identity, *p.encode(message)], zmq.NOBLOCK)
