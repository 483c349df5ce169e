"""A process's Prometheus exporter: its own CollectorRegistry (never the global one, so processes and tests
in one interpreter never share metrics) served by a small threaded WSGI server that answers GET /metrics
only, at most ``MAX_REQUESTS`` at once, each read within ``REQUEST_TIMEOUT`` seconds."""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from streaming.settings import MetricsSettings

log = logging.getLogger(__name__)

MAX_REQUESTS = 8  # scrapes served at once (Prometheus sends one per target); more: connection closed
REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request
NODE_PORTS = 64  # nodes try base + 10 .. base + 73 on one host
ROLE_OFFSET = {"aggregator": 0, "view": 1, "node": 10}

Announce = Callable[[str], None]  # told the exporter's URL once it serves


def role_ports(base: int, role: str) -> list[int]:
    """The ports a role tries, in order (base 0: any free port)."""
    if base == 0:
        return [0]
    first = base + ROLE_OFFSET[role]
    return list(range(first, first + NODE_PORTS)) if role == "node" else [first]


class _Handler(WSGIRequestHandler):
    """No access log (a scrape a second would flood it); a slow client is cut off."""

    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        return


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per request, at most MAX_REQUESTS at once: more are closed at once and counted."""

    daemon_threads = True
    allow_reuse_address = False  # a port another exporter listens on must fail to bind, not be shared

    def __init__(self, address: tuple[str, int], family: int) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_REQUESTS)
        self.refused = 0
        super().__init__(address, _Handler)

    def process_request(self, request: socket.socket, client_address: object) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def metrics_app(registry: CollectorRegistry):
    """The WSGI app: GET /metrics is the registry in Prometheus's text format; anything else 404 or 405."""
    inner = make_wsgi_app(registry)

    def app(environ: dict, start_response):
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics\n"]
        if environ.get("REQUEST_METHOD") != "GET":
            start_response("405 Method Not Allowed", [("Allow", "GET"), ("Content-Type", "text/plain")])
            return [b"only GET\n"]
        return inner(environ, start_response)

    return app


class MetricsExporter:
    """A registry of these collectors (and the process's CPU and memory), served on the first free port of
    ``ports`` at ``host``, else on any free port (logged: the ``url`` says which)."""

    def __init__(self, collectors: Iterable[Collector], host: str, ports: list[int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        for collector in collectors:
            self.registry.register(collector)
        self.host = host
        self._server = _bind(host, ports)
        self._server.set_app(metrics_app(self.registry))
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="stemstream-metrics", daemon=True
        )

    @property
    def url(self) -> str:
        """Where Prometheus scrapes this process."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/metrics"

    @property
    def refused(self) -> int:
        """Requests closed unanswered because MAX_REQUESTS were being served."""
        return self._server.refused

    def start(self) -> MetricsExporter:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()


def _bind(host: str, ports: list[int]) -> _BoundedServer:
    """A server bound to the first free port of ``ports``, else to any free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in ports:
        try:
            return _BoundedServer((host, port), family)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise OSError(f"metrics: cannot serve on {host}:{port}: {exc.strerror}") from None
    log.warning("metrics: ports %s taken on %s; serving on any free port", _span(ports), host)
    return _BoundedServer((host, 0), family)


def _span(ports: list[int]) -> str:
    return str(ports[0]) if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"


@contextmanager
def exported(
    metrics: MetricsSettings, role: str, collectors: Iterable[Collector], announce: Announce
) -> Iterator[MetricsExporter | None]:
    """An exporter of these collectors on the role's port while the block runs (None when disabled)."""
    if not metrics.enabled:
        yield None
        return
    exporter = MetricsExporter(collectors, metrics.host, role_ports(metrics.port, role)).start()
    try:
        announce(exporter.url)
        yield exporter
    finally:
        exporter.stop()
