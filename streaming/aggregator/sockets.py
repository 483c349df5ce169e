"""The aggregator's sockets: its data path's (one PULL per receiver, the node ROUTER; CURVE when keys are
given, streaming.aggregator.data_path), an optional PUB for monitors, and the two pollers of its loop. Bound
at construction, so the real ports (port 0) are known at once and stay known after the sockets are closed."""

from __future__ import annotations

import zmq

from streaming.aggregator.data_path import PathConfig, PathSockets, endpoint
from streaming.transport.security import CurveServerConfig, apply_server


class AggregatorSockets:
    """Binds and owns every socket of an aggregator; close() releases them all."""

    def __init__(
        self,
        config: PathConfig,
        monitor_bind: str | None,
        curve: CurveServerConfig | None,
        context: zmq.Context | None,
    ) -> None:
        self._own_ctx = context is None
        self.context = zmq.Context() if context is None else context
        self.path: PathSockets | None = None
        try:
            self.path = PathSockets(config, 0, self.context, curve)
            self.monitor = None
            if monitor_bind is not None:
                self.monitor = self.path.socket(zmq.PUB)
                if curve is not None:
                    apply_server(self.monitor, curve, self.context, self.path.auth)
                self.monitor.bind(monitor_bind)
        except BaseException:
            self.close()
            raise
        self.receivers, self.router = self.path.receivers, self.path.router
        self.control_poller = zmq.Poller()
        self.control_poller.register(self.router, zmq.POLLIN)
        self.data_poller = zmq.Poller()
        self.data_poller.register(self.router, zmq.POLLIN)
        for sock in self.receivers:
            self.data_poller.register(sock, zmq.POLLIN)
        self.endpoints = {
            "receivers": self.path.receiver_endpoints,
            "nodes": self.path.nodes_endpoint,
            "monitor": None if self.monitor is None else endpoint(self.monitor),
        }

    def close(self) -> None:
        """Close the sockets (bounded linger) and stop the CURVE authenticator; idempotent."""
        if self.path is not None:
            self.path.close()
        if self._own_ctx and not self.context.closed:
            self.context.term()


def describe(curve: CurveServerConfig | None) -> str:
    """How the node and monitor sockets are secured, for the start-up log line."""
    if curve is None:
        return "plain (no CURVE: for loopback or a trusted network only)"
    return f"CURVE, {len(curve.allowed_clients)} allowed client key(s)"
