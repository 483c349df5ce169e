"""The live view's metrics, read at scrape time: its page's WebSocket clients and its snapshot intake."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.registry import Collector

from streaming.metrics.exporter import Announce, MetricsExporter, exported
from streaming.metrics.families import counter, gauge
from streaming.settings import MetricsSettings

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from prometheus_client.metrics_core import Metric

    from streaming.view.server import LiveServer


@dataclass(frozen=True)
class ViewSeen:
    """The view at one moment."""

    clients: int  # pages following the state (WebSockets open)
    max_clients: int
    clients_refused: int
    snapshots: int  # snapshots taken in from the nodes
    malformed: int  # snapshots dropped as malformed
    failures: int  # errors the intake survived
    intake_up: bool


def view_families(v: ViewSeen) -> list[Metric]:
    """The view's metric families."""
    return [
        gauge("view_clients", "pages following the live state (WebSockets open)", v.clients),
        gauge("view_max_clients", "pages allowed at once (streaming.live.max_clients)", v.max_clients),
        counter("view_clients_refused", "WebSockets refused: max_clients were open", v.clients_refused),
        counter("view_snapshots_received", "live snapshots taken in from the nodes", v.snapshots),
        counter("view_snapshots_malformed", "live snapshots dropped as malformed", v.malformed),
        counter("view_intake_failures", "errors the snapshot intake survived", v.failures),
        gauge("view_intake_up", "1 while the snapshot intake runs", float(v.intake_up)),
    ]


class ViewCollector(Collector):
    """Reads a running LiveServer at each scrape (from the exporter's thread)."""

    def __init__(self, server: LiveServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        """The view's families."""
        s = self._server
        seen = ViewSeen(
            clients=len(s.clients.open),
            max_clients=s.clients.limit,
            clients_refused=s.clients.refused,
            snapshots=s.ingest.received,
            malformed=s.state.malformed,
            failures=s.ingest.failures,
            intake_up=s.ingest.alive,
        )
        yield from view_families(seen)


def view_exported(
    server: LiveServer, metrics: MetricsSettings, announce: Announce
) -> AbstractContextManager[MetricsExporter | None]:
    """The live view's exporter, as a context around its server's run."""
    return exported(metrics, "view", [ViewCollector(server)], announce)
