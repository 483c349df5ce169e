"""What the node streamer calls for the live view and the tap: one line per hook in streaming.node.streamer, each
returning at once (streaming.live.publisher, streaming.live.tap). Nothing here listens, except the tap
when ``live.tap`` is on."""

from __future__ import annotations

import zmq

from streaming.live.publisher import LivePublisher
from streaming.live.tap import LiveTap
from streaming.node.assembly import Slot
from streaming.node.config import NodeConfig
from streaming.protocol import control as p


class LiveNode:
    """The node's live snapshots and tap, either of which may be off."""

    def __init__(self, context: zmq.Context, config: NodeConfig) -> None:
        live = config.streaming.live
        self.publisher = LivePublisher(context, config) if live.enabled else None
        self.tap = LiveTap(context, config.name, live) if live.tap else None

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

    def batch(self, begin: p.ScanBegin, slot: Slot, n: int, events: object) -> None:
        """A counted batch: the first n frames of the slot, their events (an EventList)."""
        if self.publisher is not None:
            self.publisher.batch(
                begin.scan_key, slot.positions[:n], slot.masks[:n], events.offsets, events.indices
            )
        if self.tap is not None:
            self.tap.batch(slot.positions[:n], slot.frame_numbers[:n], slot.masks[:n], events)

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
