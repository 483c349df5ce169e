"""The node streamer: frames in from the aggregator, counted in worker processes, events to the writer.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "NodeConfig": "streaming.node.config",
    "NodeCounters": "streaming.node.config",
    "NodeRefused": "streaming.node.config",
    "scan_sums": "streaming.node.dark_sums",
    "NodeStreamer": "streaming.node.streamer",
    "run_node": "streaming.node.streamer",
}
__all__ = ["NodeConfig", "NodeCounters", "NodeRefused", "NodeStreamer", "run_node", "scan_sums"]

if TYPE_CHECKING:
    from streaming.node.config import NodeConfig, NodeCounters, NodeRefused
    from streaming.node.dark_sums import scan_sums
    from streaming.node.streamer import NodeStreamer, run_node


__getattr__ = lazy_exports(__name__, _WHERE)
