"""The session's watch over a running scan names a forwarding process of the aggregator that exited, once,
from the aggregator's monitor state (paths_lost), and is silent about one lost before the scan began."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from streaming.protocol import control as p
from tasks.steps.session import _NodeWatch


class _Nodes:
    def check(self) -> None:  # every node streamer alive
        return None


class _Monitor:
    def __init__(self, state: p.AggregatorState) -> None:
        self.state = state

    def latest(self) -> p.AggregatorState:
        return self.state


def _state(**lost: str) -> p.AggregatorState:
    base = p.AggregatorState("streaming", 5, 2, 2, 2, 0, 0, 0, 0)
    return replace(base, paths_lost={int(k[1:]): v for k, v in lost.items()})


def test_a_forwarding_process_lost_mid_scan_is_named_once(caplog: pytest.LogCaptureFixture) -> None:
    before = "forwarding process 1 (pid 11) exited with 1"
    monitor = _Monitor(_state(p1=before))
    logger = logging.getLogger("test-node-watch")
    watch = _NodeWatch(_Nodes(), 5, 10.0, logger, monitor)
    with caplog.at_level(logging.ERROR, logger="test-node-watch"):
        watch.check()
        assert caplog.records == []  # lost before this scan: not news
        monitor.state = _state(p1=before, p2="forwarding process 2 (pid 12) exited with -9")
        watch.check()
        watch.check()
    [record] = caplog.records
    assert (
        "scan 5" in record.getMessage()
        and "forwarding process 2 (pid 12) exited with -9" in record.getMessage()
    )
    assert watch.failure is None  # the scan goes on through the other paths
