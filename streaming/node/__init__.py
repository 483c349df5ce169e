"""The node streamer: frames in from the aggregator, counted in worker processes, events to the writer.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
