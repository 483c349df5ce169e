"""A node's connection to the aggregator: the outbound DEALER (CURVE when configured), what the node says on
it (hello, where its writer is, ready, heartbeats, done), and its standing: welcomed, or refused and why.

A refusal that may clear (every slot taken while the node this one replaces is not yet noticed lost) is
asked again, for ``node_timeout`` plus two heartbeats, before it becomes final.
"""

from __future__ import annotations

import logging
import os
import time

import zmq

from streaming.node.config import NodeConfig
from streaming.protocol import control as p
from streaming.protocol.sector import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)


class AggregatorLink:
    """The node side of the node <-> aggregator conversation (see streaming.protocol.control)."""

    def __init__(self, context: zmq.Context, config: NodeConfig) -> None:
        st = config.streaming
        self.config, self.name = config, config.name
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.socket.setsockopt(zmq.RCVHWM, 4 * st.node_batch)  # back-pressure starts here
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a sector, or a control message
        if config.curve is not None:
            from streaming.transport.security import apply_client

            apply_client(self.socket, config.curve)
        self.socket.connect(config.aggregator)
        self.welcomed = False
        self.node_index = -1
        self.refused: str | None = None  # final refusal: the node stops with this reason
        self._refused_since = 0.0
        self.last_heard = time.monotonic()
        self._last_hb = 0.0
        self._last_hello = 0.0

    def send(self, message: object) -> None:
        """Any control message."""
        self.socket.send_multipart(p.encode(message))

    def hello(self, writer_address: str) -> None:
        """Introduce this node (again); a node that hosts a writer says where it is."""
        self.send(p.Hello(self.name, os.getpid(), output_dir=str(self.config.output_dir)))
        if writer_address:
            self.writer_at(writer_address)
        self._last_hello = time.monotonic()

    def writer_at(self, address: str) -> None:
        """Announce the writer this node hosts."""
        self.send(p.WriterAt(self.name, address, str(self.config.output_dir)))

    def ready(self, last_scan: int) -> None:
        """Armed for the next scan."""
        self.send(p.Ready(self.name, last_scan))

    def welcome(self, w: p.Welcome) -> None:
        """Note the welcome (index; the roles are the node's business)."""
        if not self.welcomed:
            log.info("%s: welcomed as node %d of %d", self.name, w.node_index, w.n_nodes)
        self.node_index, self.welcomed = w.node_index, True

    def bye(self, bye: p.Bye) -> bool:
        """A bye: a refusal before the welcome (sets ``refused`` once final), else the aggregator going
        away; returns True in the second case (the node then closes its open scan and says hello again)."""
        if self.welcomed:
            log.warning("%s: the aggregator went away (%s)", self.name, bye.reason)
            self.welcomed = False
            return True
        now = time.monotonic()
        if not bye.final:
            st = self.config.streaming
            first = not self._refused_since
            self._refused_since = self._refused_since or now
            if now - self._refused_since < st.node_timeout + 2 * st.heartbeat:
                if first:
                    log.warning("%s: %s; asking again for %g s", self.name, bye.reason, st.node_timeout)
                return False
        self.refused = bye.reason
        log.error("%s: refused by the aggregator: %s", self.name, bye.reason)
        return False

    def tick(self, now: float, state: str, scan_number: int, writer_address: str) -> None:
        """Heartbeats, and hellos until welcomed (a restarted aggregator learns about us again)."""
        st = self.config.streaming
        if now - self._last_hb > st.heartbeat:
            self.send(p.Heartbeat(self.name, state, scan_number))
            self._last_hb = now
        if not self.welcomed and now - self._last_hello > max(st.heartbeat, 1.0):
            self.hello(writer_address)

    def close(self) -> None:
        """Close the socket: a bounded linger while the aggregator is there to take what is queued; none
        once it went away (what is queued then is hellos and heartbeats for nobody: not worth a wait)."""
        self.socket.close(linger=2000 if self.welcomed else 0)
