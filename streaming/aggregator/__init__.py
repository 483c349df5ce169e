"""The aggregator (path 0) and its forwarding processes: sectors in, whole frames out to the nodes.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "Aggregator": "streaming.aggregator.aggregator",
    "run_aggregator": "streaming.aggregator.aggregator",
    "AggregatorConfig": "streaming.aggregator.config",
    "Forwarder": "streaming.aggregator.forwarder",
    "run_forwarder": "streaming.aggregator.forwarder",
    "AggregatorStats": "streaming.aggregator.stats",
}
__all__ = [
    "Aggregator",
    "AggregatorConfig",
    "AggregatorStats",
    "Forwarder",
    "run_aggregator",
    "run_forwarder",
]

if TYPE_CHECKING:
    from streaming.aggregator.aggregator import Aggregator, run_aggregator
    from streaming.aggregator.config import AggregatorConfig
    from streaming.aggregator.forwarder import Forwarder, run_forwarder
    from streaming.aggregator.stats import AggregatorStats


__getattr__ = lazy_exports(__name__, _WHERE)
