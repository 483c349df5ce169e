"""The aggregator's sockets: one PULL per receiver, the ROUTER the nodes connect to (CURVE when keys are
given), an optional PUB for monitors, and the two pollers of its loop. Bound at construction, so the real
ports (port 0) are known at once and stay known after the sockets are closed."""

from __future__ import annotations

import zmq

from streaming.settings import StreamingSettings
from streaming.transport.security import CurveServerConfig, apply_server

LINGER_MS = 1000


class AggregatorSockets:
    """Binds and owns every socket of an aggregator; close() releases them all."""

    def __init__(
        self, st: StreamingSettings, curve: CurveServerConfig | None, context: zmq.Context | None
    ) -> None:
        self._own_ctx = context is None
        self.context = zmq.Context() if context is None else context
        self._auth = None
        self._all: list[zmq.Socket] = []
        try:
            self._bind(st, curve)
        except BaseException:
            self.close()
            raise

    def _bind(self, st: StreamingSettings, curve: CurveServerConfig | None) -> None:
        self.receivers = []
        for address in st.receivers:
            sock = self._socket(zmq.PULL)
            sock.rcvhwm = st.aggregator_receiver_hwm
            sock.bind(address)
            self.receivers.append(sock)
        self.router = self._socket(zmq.ROUTER)
        self.router.router_mandatory = 1  # a vanished node is an error, not a silent drop
        self.router.router_handover = 1  # a reconnect with the same identity takes over
        self.router.sndhwm = st.aggregator_node_hwm
        if curve is not None:
            self._auth = apply_server(self.router, curve, self.context)
        self.router.bind(st.nodes_bind)
        self.monitor = None
        if st.monitor_bind is not None:
            self.monitor = self._socket(zmq.PUB)
            if curve is not None:
                apply_server(self.monitor, curve, self.context, self._auth)
            self.monitor.bind(st.monitor_bind)
        self.control_poller = zmq.Poller()
        self.control_poller.register(self.router, zmq.POLLIN)
        self.data_poller = zmq.Poller()
        self.data_poller.register(self.router, zmq.POLLIN)
        for sock in self.receivers:
            self.data_poller.register(sock, zmq.POLLIN)
        self.endpoints = {
            "receivers": [_endpoint(s) for s in self.receivers],
            "nodes": _endpoint(self.router),
            "monitor": None if self.monitor is None else _endpoint(self.monitor),
        }

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.linger = LINGER_MS
        self._all.append(sock)
        return sock

    def close(self) -> None:
        """Close the sockets (bounded linger) and stop the CURVE authenticator; idempotent."""
        for sock in self._all:
            sock.close(linger=LINGER_MS)
        self._all = []
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_ctx and not self.context.closed:
            self.context.term()


def _endpoint(sock: zmq.Socket) -> str:
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()
