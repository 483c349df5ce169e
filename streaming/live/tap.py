"""The counted-data tap: a PUB socket on the node publishing every counted batch (streaming.protocol.live), for
another consumer (a ptychography or tomography pipeline) to subscribe to. Off unless ``live.tap``.

Node i binds ``tcp://<live.tap_host>:<live.tap_port + i>`` once the aggregator has told it its index; it is
the only socket the live view side of stemstream listens on at the HPC side. PUB never waits: a subscriber
that falls ``tap_hwm`` batches behind loses batches (its own, nobody else's), and the per-node ``seq`` of
each batch and the totals in ``tap.end`` tell it what it missed.
"""

from __future__ import annotations

import logging

import numpy as np
import zmq

from streaming.protocol import control as p
from streaming.protocol import live as live_wire
from streaming.settings import LiveSettings

log = logging.getLogger(__name__)


class LiveTap:
    """The node's tap socket; every call returns at once."""

    def __init__(self, context: zmq.Context, name: str, live: LiveSettings) -> None:
        self._ctx, self.name, self.settings = context, name, live
        self.socket: zmq.Socket | None = None
        self.address = ""
        self.seq = 0
        self.failed = 0  # batches zmq refused at once (it does not say which subscriber)
        self._scan: dict = {}
        self._batches = self._frames = 0

    def welcome(self, node_index: int) -> None:
        """Bind on tap_port + node_index (again if the index changed)."""
        address = f"tcp://{self.settings.tap_host}:{self.settings.tap_port + node_index}"
        if address == self.address:
            return
        if self.socket is not None:
            self.socket.close(linger=0)
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, self.settings.tap_hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, 1024)  # it takes only subscriptions (a few bytes) in
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:  # the tap is an extra: counting goes on without it
            log.error("%s: the tap cannot bind %s (%s); no tap", self.name, address, exc)
            sock.close(linger=0)
            self.socket, self.address = None, address
            return
        self.socket, self.address = sock, address
        log.info("%s: counted-data tap on %s", self.name, address)

    def begin(self, begin: p.ScanBegin) -> None:
        """Announce a scan."""
        self._scan = {"scan_number": begin.scan_number, "scan_key": begin.scan_key, "node": self.name}
        self._batches = self._frames = 0
        header = {
            **self._scan,
            "width": begin.scan_width,
            "height": begin.scan_height,
            "expected_frames": begin.expected_frames,
            "node_index": begin.node_index,
            "n_nodes": begin.n_nodes,
        }
        self._send(live_wire.encode(live_wire.TAP_BEGIN, header))

    def batch(self, positions: np.ndarray, numbers: np.ndarray, masks: np.ndarray, events: object) -> None:
        """Publish one counted batch (``events``: the counting kernel's EventList)."""
        if self.socket is None:
            return
        header = {**self._scan, "seq": self.seq, "frames": len(positions)}
        arrays = {
            "positions": positions,
            "frame_numbers": numbers,
            "masks": masks,
            "offsets": events.offsets,
            "indices": events.indices,
        }
        self.seq += 1
        self._batches += 1
        self._frames += len(positions)
        self._send(live_wire.encode(live_wire.TAP_EVENTS, header, arrays))

    def end(self) -> None:
        """The node counted everything of the scan."""
        self._send(
            live_wire.encode(
                live_wire.TAP_END, {**self._scan, "batches": self._batches, "frames": self._frames}
            )
        )

    def close(self) -> None:
        """Close the socket (nothing waits for subscribers)."""
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    def _send(self, parts: list) -> None:
        if self.socket is None:
            return
        try:
            self.socket.send_multipart(parts, flags=zmq.NOBLOCK)  # copies: slot views are reused at once
        except zmq.ZMQError:
            self.failed += 1
