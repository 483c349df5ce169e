"""A node's connection to the session's scan writer: what it sends (scan begins, threshold samples, counted
frames, done) and what comes back (each scan's thresholds with the dark and gain to count with).

The writer's address comes from the aggregator (node 0 hosts the writer); until it is known the client is
unconnected, and the node does not arm. A new address (node 0 restarted) reconnects the socket.
"""

from __future__ import annotations

import logging

import numpy as np
import zmq

from streaming.protocol import control as p
from streaming.protocol.calibration import calibration_arrays
from streaming.transport.security import CurveClientConfig, apply_client, peer_curve

log = logging.getLogger(__name__)


class WriterClient:
    """DEALER to the scan writer (CURVE with the nodes' keys when the node has them); never drops counted
    events (no send high-water mark)."""

    def __init__(
        self, context: zmq.Context, name: str, rcvhwm: int, curve: CurveClientConfig | None = None
    ) -> None:
        self._ctx, self.name, self._rcvhwm = context, name, rcvhwm
        self._curve = peer_curve(curve)[1] if curve is not None else None
        self.address = ""
        self.socket: zmq.Socket | None = None

    @property
    def connected(self) -> bool:
        """True once the writer's address is known."""
        return self.socket is not None

    def connect(self, address: str) -> bool:
        """Connect to the writer at address; True when that is a change (a new or restarted writer)."""
        if address == self.address:
            return False
        if self.socket is not None:
            log.warning("%s: the scan writer moved from %s to %s", self.name, self.address, address)
            self.socket.close(linger=0)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.SNDHWM, 0)  # counted events must never be dropped on the way to the writer
        if self._curve is not None:
            apply_client(sock, self._curve)
        sock.connect(address)
        self.socket, self.address = sock, address
        return True

    def send(self, message: object, *arrays: object) -> None:
        """A control message, followed by binary parts (arrays or bytes)."""
        self.socket.send_multipart([*p.encode(message), *arrays])

    def begin(self, begin: p.ScanBegin) -> None:
        """Tell the writer this node starts a scan."""
        self.send(
            p.NodeScanBegin(
                name=self.name,
                scan_number=begin.scan_number,
                scan_width=begin.scan_width,
                scan_height=begin.scan_height,
                n_nodes=begin.n_nodes,
                node_index=begin.node_index,
                session_id=begin.session_id,
                scan_key=begin.scan_key,
            )
        )

    def events(
        self,
        begin: p.ScanBegin,
        positions: np.ndarray,
        numbers: np.ndarray,
        masks: np.ndarray,
        events: object,
    ) -> None:
        """A counted batch (send_multipart copies each part, so slot views are safe to reuse at once)."""
        header = p.EventsHeader(
            name=self.name, scan_number=begin.scan_number, frames=len(positions), scan_key=begin.scan_key
        )
        self.send(header, positions, numbers, masks, events.offsets, events.indices)

    def receive(self) -> list[tuple[p.ScanThresholds, np.ndarray | None, np.ndarray | None]]:
        """Thresholds that arrived, each with the dark and gain it comes with (raises ProtocolError)."""
        out = []
        while self.socket is not None and self.socket.poll(0):
            parts = self.socket.recv_multipart()
            t = p.decode(parts[0], parts[1], p.ScanThresholds)
            dark, gain = calibration_arrays(parts[2], parts[3]) if t.calibration else (None, None)
            out.append((t, dark, gain))
        return out

    def close(self, linger_ms: int) -> None:
        """Close the socket."""
        if self.socket is not None:
            self.socket.close(linger=linger_ms)
            self.socket = None
