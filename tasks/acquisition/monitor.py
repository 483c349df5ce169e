"""Watching the aggregator's monitor channel: readiness and scan progress, always with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from counting.errors import TransientError
from streaming.protocol import control as p
from streaming.transport.security import CurveClientConfig, apply_client
from tasks.launch.plan import SessionPlan


class MonitorTimeout(TransientError, TimeoutError):
    """The aggregator did not reach the awaited state in time."""


def _subscriber(address: str, curve: CurveClientConfig | None) -> zmq.Socket:
    """A SUB socket on the aggregator's monitor (a CURVE client when the aggregator is a CURVE server)."""
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, p.STATE)
    sub.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        apply_client(sub, curve)
    sub.connect(address)
    return sub


def wait_for_state(
    address: str,
    until: Callable[[p.AggregatorState], bool],
    timeout: float,
    on_state: Callable[[p.AggregatorState], None] | None = None,
    check: Callable[[], None] | None = None,
    what: str = "the awaited state",
    curve: CurveClientConfig | None = None,
) -> p.AggregatorState:
    """Read monitor states until ``until(state)``; ``check()`` runs between polls (raise to abort)."""
    sub = _subscriber(address, curve)
    last: p.AggregatorState | None = None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check is not None:
                check()
            if sub.poll(200):
                kind, body = sub.recv_multipart()
                try:
                    last = p.decode(kind, body, p.AggregatorState)
                except p.ProtocolError:
                    continue
                if on_state is not None:
                    on_state(last)
                if until(last):
                    return last
        seen = (
            "no state from the aggregator"
            if last is None
            else f"last state: {last.state}, {last.nodes_ready}/{last.n_nodes} nodes ready"
        )
        raise MonitorTimeout(f"timed out after {timeout:.0f} s waiting for {what} ({seen})")
    finally:
        sub.close()


class MonitorFollower:
    """Keeps the latest aggregator state without blocking (for progress while something else waits)."""

    def __init__(self, address: str, curve: CurveClientConfig | None = None):
        self._sock = _subscriber(address, curve)
        self.state: p.AggregatorState | None = None

    def latest(self) -> p.AggregatorState | None:
        """Drain what has arrived and return the newest state (None before the first one)."""
        while self._sock.poll(0):
            kind, body = self._sock.recv_multipart()
            try:
                self.state = p.decode(kind, body, p.AggregatorState)
            except p.ProtocolError:
                continue
        return self.state

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


def latest_state(address: str, curve: CurveClientConfig | None, timeout: float) -> p.AggregatorState | None:
    """The next state the aggregator publishes (it does every heartbeat), or None within timeout."""
    try:
        return wait_for_state(address, lambda _: True, timeout, curve=curve)
    except MonitorTimeout:
        return None


def refused_report(plan: SessionPlan, timeout: float = 3.0) -> str:
    """Scans that arrived before the session was ready, as the aggregator counted them ("" if none, or
    when the aggregator no longer answers: after a failure it may be gone, and this is only a report)."""
    try:
        state = latest_state(plan.monitor_connect, plan.monitor_curve(), timeout)
    except (zmq.ZMQError, OSError, ValueError):  # no address bound yet, or CURVE key files missing
        return ""
    if state is None or not state.refused:
        return ""
    scans = ", ".join(f"{n} ({k} sectors)" for n, k in sorted(state.refused_scans.items()))
    return f"{state.refused} sector(s) refused: scan(s) {scans} arrived before the session was ready"
