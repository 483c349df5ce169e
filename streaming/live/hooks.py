"""What the node streamer calls for the live view and the tap: one line per hook in streaming.node.streamer, each
returning at once (streaming.live.publisher, streaming.live.tap). Nothing here listens, except the tap
when ``live.tap`` is on."""

from __future__ import annotations

import numpy as np
import zmq

from streaming.live.publisher import LivePublisher
from streaming.live.tap import LiveTap
from streaming.protocol import control as p
from streaming.settings import LiveSettings
from streaming.transport.security import CurveClientConfig


class LiveNode:
    """The node's live snapshots and tap, either of which may be off.

    name: the node's name; live: the live settings; aggregator: the aggregator's address as the node
    reaches it (the view is found beside it unless live.connect says otherwise); curve: the node's CURVE
    client keys (None: plain).
    """

    def __init__(
        self,
        context: zmq.Context,
        name: str,
        live: LiveSettings,
        aggregator: str,
        curve: CurveClientConfig | None,
    ) -> None:
        self.publisher = LivePublisher(context, name, live, aggregator, curve) if live.enabled else None
        self.tap = LiveTap(name, live, curve) if live.tap else None  # its own context

    @property
    def tap_refused(self) -> str | None:
        """Why the tap asked for is off (logged once when the node started), or None."""
        return self.tap.refused if self.tap is not None else None

    def welcome(self, node_index: int) -> None:
        """The aggregator told the node its index (the tap's port)."""
        if self.tap is not None:
            self.tap.welcome(node_index)

    def begin(self, begin: p.ScanBegin) -> None:
        """A scan begins on this node."""
        if self.publisher is not None:
            self.publisher.begin(begin)
        if self.tap is not None:
            self.tap.begin(begin)

    def batch(
        self,
        begin: p.ScanBegin,
        positions: np.ndarray,
        numbers: np.ndarray,
        masks: np.ndarray,
        events: object,
    ) -> None:
        """A counted batch: its frames' positions, frame numbers and sector masks (views of a slot that
        is reused at once), and their events (an EventList)."""
        if self.publisher is not None:
            self.publisher.batch(begin.scan_key, positions, masks, events.offsets, events.indices)
        if self.tap is not None:
            self.tap.batch(positions, numbers, masks, events)

    def end(self, begin: p.ScanBegin) -> None:
        """The node counted everything of the scan."""
        if self.publisher is not None:
            self.publisher.end(begin.scan_key)
        if self.tap is not None:
            self.tap.end()

    def close(self) -> None:
        """Final snapshots out, sockets closed (before the context ends)."""
        if self.publisher is not None:
            self.publisher.close()
        if self.tap is not None:
            self.tap.close()
