"""The Prometheus exporters (streaming.metrics): collectors report exactly the counters they read, the HTTP
server answers GET /metrics only and at most MAX_REQUESTS at once, and a taken port is no failure."""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from counting.geometry import SECTOR_BYTES
from stemstream_testing.support import CLI, wait_until
from streaming.aggregator.aggregator import Aggregator
from streaming.aggregator.registry import NodeEntry
from streaming.metrics.aggregator import AggregatorCollector, aggregator_families, nodes_seen
from streaming.metrics.exporter import MAX_REQUESTS, MetricsExporter, exported, role_ports
from streaming.metrics.node import NodeCollector, NodeGauges, node_families, process_running, writer_families
from streaming.metrics.view import ViewSeen, view_families
from streaming.node.config import NodeCounters
from streaming.protocol import control as p
from streaming.protocol.record import ScanRecord, ScanStatus
from streaming.settings import MetricsSettings, StreamingSettings

LOOPBACK = "tcp://127.0.0.1:0"


class Fixed(Collector):
    """Serves a fixed list of families."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        yield from self.families


def registry_of(families: list) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(Fixed(families))
    return registry


def record(number: int, status: ScanStatus, frames: int, expected: int, completeness: float) -> ScanRecord:
    return ScanRecord(
        scan_number=number, status=status, path=None, scan_width=4, scan_height=4, expected_frames=expected,
        frames_written=frames, complete_frames=frames, completeness=completeness, events=0, nodes=2,
        nodes_done=2, reasons=[], sectors_lost_in_transit=0, thresholds=[], last_data_time=100.0,
        written_time=100.25,
    )  # fmt: skip


def test_aggregator_families_are_the_monitor_state() -> None:
    state = p.AggregatorState(
        state="streaming", scan_number=7, nodes_connected=1, nodes_ready=1, n_nodes=2, received=0,
        forwarded=0, malformed=0, unroutable=0, scan_expected=64, scan_received=40,
        per_path={0: {"received": 10, "forwarded": 9, "late": 3, "malformed": 2, "refused": 1, "unroutable": 1},
                  1: {"received": 5, "forwarded": 5}},
        paths_lost={1: "exit code 1"},
    )  # fmt: skip
    nodes = nodes_seen(
        [NodeEntry("a", 0, b"a", connected=True, ready=True, last_seen=98.0),
         NodeEntry("b2", 1, b"b", connected=False, last_seen=90.0)],
        {"a": 0, "b1": 1, "b2": 1},
        {"a": 6, "b1": 4, "b2": 4, "stranger": 1},
        now=100.0,
    )  # fmt: skip
    r = registry_of(aggregator_families(state, 3, nodes))
    v = r.get_sample_value
    assert v("stemstream_aggregator_sectors_received_total", {"path": "0"}) == 10
    assert v("stemstream_aggregator_sectors_received_total", {"path": "1"}) == 5
    assert v("stemstream_aggregator_sectors_late_total", {"path": "0"}) == 3
    assert v("stemstream_aggregator_sectors_malformed_total", {"path": "0"}) == 2
    assert v("stemstream_aggregator_sectors_refused_total", {"path": "0"}) == 1
    assert v("stemstream_aggregator_sectors_unroutable_total", {"path": "1"}) == 0
    assert v("stemstream_aggregator_received_bytes_total", {"path": "1"}) == 5 * SECTOR_BYTES
    assert v("stemstream_aggregator_scans_begun_total") == 3
    assert v("stemstream_aggregator_state", {"state": "streaming"}) == 1
    assert v("stemstream_aggregator_state", {"state": "armed"}) == 0
    assert v("stemstream_aggregator_scan_open") == 1
    assert (
        v("stemstream_aggregator_scan_sectors_expected"),
        v("stemstream_aggregator_scan_sectors_received"),
    ) == (
        64,
        40,
    )
    assert v("stemstream_aggregator_nodes") == 2 and v("stemstream_aggregator_nodes_connected") == 1
    assert v("stemstream_aggregator_forwarders_lost") == 1
    assert v("stemstream_aggregator_node_up", {"node": "0"}) == 1
    assert v("stemstream_aggregator_node_up", {"node": "1"}) == 0
    assert v("stemstream_aggregator_node_ready", {"node": "1"}) == 0
    assert v("stemstream_aggregator_node_heartbeat_age_seconds", {"node": "1"}) == 10.0
    # a restarted node's sectors under its old name stay in its index's counter; unknown names are not a label
    assert v("stemstream_aggregator_node_sectors_forwarded_total", {"node": "1"}) == 8
    assert v("stemstream_aggregator_node_sectors_forwarded_total", {"node": "0"}) == 6


def test_aggregator_collector_reads_a_real_aggregator() -> None:
    settings = StreamingSettings(receivers=[LOOPBACK], nodes_bind=LOOPBACK, monitor_bind=None, n_nodes=1)
    with Aggregator(settings) as agg:
        agg.stats.received, agg.stats.forwarded, agg.stats.late, agg.stats.scans = 12, 11, 1, 2
        registry = CollectorRegistry()
        registry.register(AggregatorCollector(agg))
        v = registry.get_sample_value
        assert v("stemstream_aggregator_sectors_received_total", {"path": "0"}) == 12
        assert v("stemstream_aggregator_sectors_forwarded_total", {"path": "0"}) == 11
        assert v("stemstream_aggregator_sectors_late_total", {"path": "0"}) == 1
        assert v("stemstream_aggregator_scans_begun_total") == 2
        assert v("stemstream_aggregator_state", {"state": "waiting"}) == 1
        agg.stats.received += 5  # read at scrape time: nothing is counted twice
        assert v("stemstream_aggregator_sectors_received_total", {"path": "0"}) == 17


def test_node_families_are_its_counters() -> None:
    counters = NodeCounters(scans=2, sectors=400, malformed=1, stray=3, frames=99, incomplete_frames=1,
                            duplicates=4, late_sectors=5)  # fmt: skip
    gauges = NodeGauges(index=1, held=7, hold_limit=1024, counting=2, workers=2, workers_alive=1,
                        worker_restarts=3)  # fmt: skip
    v = registry_of(node_families(counters, gauges)).get_sample_value
    assert v("stemstream_node_frames_counted_total") == 99
    assert v("stemstream_node_frames_incomplete_total") == 1
    assert v("stemstream_node_sectors_received_total") == 400
    assert v("stemstream_node_messages_malformed_total") == 1
    assert v("stemstream_node_sectors_stray_total") == 3
    assert v("stemstream_node_sectors_late_total") == 5
    assert v("stemstream_node_sectors_duplicate_total") == 4
    assert v("stemstream_node_scans_done_total") == 2
    assert v("stemstream_node_index") == 1 and v("stemstream_node_held_messages") == 7
    assert (
        v("stemstream_node_counting_workers_alive") == 1
        and v("stemstream_node_counting_worker_restarts_total") == 3
    )


def test_writer_families_are_its_stop_records() -> None:
    records = [
        record(1, ScanStatus.COMPLETE, 16, 16, 1.0),
        record(2, ScanStatus.FAILED, 0, 16, 0.0),
        record(3, ScanStatus.INCOMPLETE, 15, 16, 0.9),
    ]
    v = registry_of(writer_families(records, malformed=2)).get_sample_value
    assert v("stemstream_writer_hosted") == 1
    assert v("stemstream_writer_scans_total", {"status": "complete"}) == 1
    assert v("stemstream_writer_scans_total", {"status": "incomplete"}) == 1
    assert v("stemstream_writer_scans_total", {"status": "failed"}) == 1
    assert v("stemstream_writer_frames_written_total") == 31
    assert v("stemstream_writer_messages_malformed_total") == 2
    assert v("stemstream_writer_last_scan_number") == 3
    assert v("stemstream_writer_last_scan_completeness_ratio") == 0.9
    assert v("stemstream_writer_last_scan_frames_incomplete") == 1
    assert v("stemstream_writer_last_scan_seconds_to_file") == pytest.approx(0.25)
    elsewhere = registry_of(writer_families(None, 0)).get_sample_value  # a node hosting no writer
    assert elsewhere("stemstream_writer_hosted") == 0
    assert elsewhere("stemstream_writer_last_scan_number") is None


def test_view_families() -> None:
    seen = ViewSeen(clients=2, max_clients=16, clients_refused=1, snapshots=30, malformed=4, failures=0,
                    intake_up=True)  # fmt: skip
    v = registry_of(view_families(seen)).get_sample_value
    assert v("stemstream_view_clients") == 2 and v("stemstream_view_clients_refused_total") == 1
    assert v("stemstream_view_snapshots_received_total") == 30
    assert v("stemstream_view_snapshots_malformed_total") == 4
    assert v("stemstream_view_intake_up") == 1


def test_workers_alive_is_read_from_proc_without_reaping() -> None:
    assert process_running(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert wait_until(lambda: not process_running(child.pid), 10)  # a zombie is not running
    assert child.wait(5) == 0  # still ours to reap: the check did not wait for it
    assert not process_running(child.pid)


def get(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def answers(url: str) -> bool:
    """Whether a GET is served now: a connection closed unanswered (every slot still held, as for a
    moment after idle clients close while their handlers wake up) is not served yet."""
    try:
        return get(url)[0] == 200
    except (ConnectionError, http.client.HTTPException, urllib.error.URLError):
        return False


def test_role_ports() -> None:
    assert role_ports(17300, "aggregator") == [17300]
    assert role_ports(17300, "view") == [17301]
    nodes = role_ports(17300, "node")
    assert nodes[0] == 17310 and len(nodes) == 64 and nodes[-1] == 17373
    assert role_ports(0, "node") == [0]


def test_exporter_answers_get_metrics_only_and_is_bounded() -> None:
    seen = ViewSeen(clients=0, max_clients=16, clients_refused=0, snapshots=3, malformed=0, failures=0,
                    intake_up=True)  # fmt: skip
    exporter = MetricsExporter([Fixed(view_families(seen))], "127.0.0.1", [0]).start()
    try:
        status, text = get(exporter.url)
        assert status == 200
        names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        assert "stemstream_view_snapshots_received_total" in names
        assert "process_resident_memory_bytes" in names  # the process's own, in this registry only
        base = exporter.url.removesuffix("/metrics")
        assert get(base + "/")[0] == 404
        assert get(base + "/metrics/x")[0] == 404
        assert get(exporter.url, "POST")[0] == 405
        assert get(exporter.url, "DELETE")[0] == 405
        # MAX_REQUESTS connections that send nothing hold every slot: one more is closed unanswered
        idle = [socket.create_connection(("127.0.0.1", exporter.port)) for _ in range(MAX_REQUESTS)]
        try:
            assert wait_until(lambda: exporter._server._slots._value == 0, 5)
            extra = socket.create_connection(("127.0.0.1", exporter.port))
            extra.settimeout(5)
            extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert extra.recv(100) == b""
            extra.close()
            assert exporter.refused == 1
        finally:
            for s in idle:
                s.close()
        assert wait_until(lambda: answers(exporter.url), 5)  # the slots come back
    finally:
        exporter.stop()


def test_a_taken_port_is_no_failure_and_disabled_is_none() -> None:
    first = MetricsExporter([], "127.0.0.1", [0]).start()
    try:
        second = MetricsExporter([], "127.0.0.1", [first.port]).start()  # taken: any free port
        try:
            assert second.port not in (0, first.port)
            assert get(second.url)[0] == 200
        finally:
            second.stop()
    finally:
        first.stop()
    with exported(MetricsSettings(enabled=False), "node", [], print) as none:
        assert none is None
    urls: list[str] = []
    with exported(MetricsSettings(port=0), "view", [], urls.append) as exporter:
        assert exporter is not None and urls == [exporter.url] and get(exporter.url)[0] == 200
    with pytest.raises(OSError):
        get(urls[0])


def test_no_bad_host() -> None:
    with pytest.raises(OSError, match="metrics: cannot serve on 203.0.113.1"):
        MetricsExporter([], "203.0.113.1", [17300])


def test_settings_section() -> None:
    m = StreamingSettings().metrics
    assert (m.enabled, m.host, m.port) == (True, "127.0.0.1", 17300)


def test_the_metrics_page_lists_every_metric_served() -> None:
    state = p.AggregatorState(
        state="armed", scan_number=-1, nodes_connected=1, nodes_ready=1, n_nodes=1, received=0,
        forwarded=0, malformed=0, unroutable=0, per_path={0: {}},
    )  # fmt: skip
    families = [
        *aggregator_families(state, 0, nodes_seen([NodeEntry("a", 0, b"a")], {"a": 0}, {}, 0.0)),
        *node_families(NodeCounters(), NodeGauges(0, 0, 0, 0, 0, 0, 0)),
        *writer_families([record(1, ScanStatus.COMPLETE, 1, 1, 1.0)], 0),
        *view_families(ViewSeen(0, 0, 0, 0, 0, 0, True)),
    ]
    served = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    page = (Path(__file__).parents[2] / "docs" / "facility" / "metrics.md").read_text()
    listed = set(re.findall(r"^\| `(stemstream_[a-z0-9_]+)` \|", page, re.M))
    assert served == listed, (served - listed, listed - served)


def test_a_node_whose_metrics_cannot_be_served_stops_before_it_starts(tmp_path) -> None:
    """A bad metrics address is one error line and exit 1, before the node allocates anything (its exporter
    starts first and collects nothing until the node exists)."""
    assert list(NodeCollector().collect()) == []
    env = {**os.environ, "STEMSTREAM_STREAMING__METRICS__HOST": "203.0.113.1"}  # not this host's
    args = [
        "node",
        "--aggregator",
        "tcp://127.0.0.1:9",
        "--output-dir",
        str(tmp_path / "out"),
        "--workers",
        "0",
    ]
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "error: metrics: cannot serve on 203.0.113.1:17310" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
