"""A node's connections to the aggregator's forwarding processes (streaming.aggregator.forwarder): one outbound DEALER
each (CURVE when the aggregator link uses it), on the aggregator's host at the ports its welcome lists.
Each says ``attach`` with the node's name and is answered; the node arms only once every one has answered,
so no forwarder ever routes a sector to a node it cannot reach yet."""

from __future__ import annotations

import logging

import zmq

from streaming.node.config import NodeConfig
from streaming.protocol import control as p
from streaming.protocol.sector import MAX_MESSAGE_BYTES
from streaming.transport.addresses import with_port

__all__ = ["ForwarderLinks", "forwarder_address"]

log = logging.getLogger(__name__)


forwarder_address = with_port  # the aggregator's address as this node reaches it, with another port


class ForwarderLinks:
    """The DEALERs to the forwarders of the aggregator's welcome, and which have answered."""

    def __init__(self, context: zmq.Context, config: NodeConfig) -> None:
        self.context, self.config = context, config
        self.ports: list[int] = []
        self.sockets: list[zmq.Socket] = []
        self.attached: set[int] = set()  # forwarder numbers that answered

    def update(self, ports: list[int]) -> bool:
        """Connect to the forwarders of a welcome (again only when they changed); True when they did."""
        if list(ports) == self.ports:
            return False
        self.close()
        self.ports = list(ports)
        for port in self.ports:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.setsockopt(zmq.RCVHWM, 4 * self.config.streaming.node_batch)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a sector, or a control message
            if self.config.curve is not None:
                from streaming.transport.security import apply_client

                apply_client(sock, self.config.curve)
            sock.connect(forwarder_address(self.config.aggregator, port))
            sock.send_multipart(p.encode(p.Attach(name=self.config.name)))
            self.sockets.append(sock)
        if self.ports:
            log.info(
                "%s: connecting to %d forwarding process(es), ports %s", self.config.name, len(ports), ports
            )
        return True

    def on_attached(self, body: bytes) -> None:
        """A forwarder answered our attach."""
        answer = p.decode(p.ATTACH, body, p.Attach)
        self.attached.add(answer.path)

    @property
    def all_attached(self) -> bool:
        """Every forwarder of the welcome has answered."""
        return len(self.attached) >= len(self.ports)

    def close(self) -> None:
        """Close every connection (bounded linger)."""
        for sock in self.sockets:
            sock.close(linger=2000)
        self.sockets, self.attached = [], set()
