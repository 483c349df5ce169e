"""A session's numbers in a real Prometheus (Debian's `prometheus`, scripts/install-test-deps.sh): the
aggregator, two nodes (node 0 hosting the scan writer) and the live view as real processes on loopback,
each serving its metrics; Prometheus scrapes them every second. After a scan, its HTTP API has the frames
counted equal to the file's frame count and no losses; and every query of the Grafana dashboard
(deploy/grafana/stemstream-session.json) names metrics the exporters serve and is accepted by Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from counting.geometry import ScanShape
from counting.simulator import SimulatorConfig
from counting.sparse import read_counted_scan
from stemstream_testing.pipeline import ProcessPipeline
from stemstream_testing.support import CLI, free_port, stop_process, wait_until

pytestmark = pytest.mark.xdist_group("prometheus")  # one module-scoped pipeline and Prometheus

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "stemstream-session.json"
SCAN = ScanShape(16, 16)


@dataclass
class Stack:
    """The running pipeline, its view, Prometheus, and the scan it counted."""

    pipe: ProcessPipeline
    targets: dict[str, str]  # process -> its metrics URL
    api: str  # Prometheus's base URL
    frames_in_file: int


def metrics_url(log: str) -> str | None:
    """The URL of a process's ``metrics:`` line, if it printed one."""
    found = re.search(r"^metrics: (http://\S+)$", log, re.M)
    return found.group(1) if found else None


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def query(api: str, expr: str) -> dict:
    """Prometheus's answer to an instant query."""
    return get_json(f"{api}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")


def value(api: str, expr: str) -> float | None:
    """The one value of an instant query (None: no series yet)."""
    result = query(api, expr)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus is not installed: run scripts/install-test-deps.sh")
    work = tmp_path_factory.mktemp("prometheus")
    live = {"bind": f"tcp://127.0.0.1:{free_port()}"}
    streaming = {"metrics": {"port": 0}, "live": live}  # port 0: any free port each, as printed
    with ProcessPipeline(work, 2, streaming=streaming) as pipe:
        view_log = open(work / "view.log", "w")  # noqa: SIM115 (closed below)
        view = subprocess.Popen(
            [*CLI, "--settings", str(pipe.settings_file), "view", "--port", "0"],
            stdout=view_log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True,
        )  # fmt: skip
        prometheus = None
        try:
            logs = {"aggregator": "agg", "node 0": "n0", "node 1": "n1"}
            read = {**{k: (lambda n=n: pipe.log(n)) for k, n in logs.items()},
                    "view": lambda: (work / "view.log").read_text()}  # fmt: skip
            assert wait_until(lambda: all(metrics_url(r()) for r in read.values()), 60), pipe.tails()
            targets = {k: metrics_url(r()) for k, r in read.items()}
            prometheus, api = start_prometheus(work, list(targets.values()))
            pipe.send(SimulatorConfig(SCAN, seed=3), scan_number=1)
            _, h5 = pipe.record(1, timeout=60)
            yield Stack(pipe, targets, api, read_counted_scan(h5).num_frames)
        finally:
            for proc in (prometheus, view):
                stop_process(proc, grace=15)
            view_log.close()


def start_prometheus(work: Path, targets: list[str]) -> tuple[subprocess.Popen, str]:
    """Prometheus on a free loopback port, scraping ``targets`` every second; returns once it is ready."""
    hosts = [urllib.parse.urlsplit(t).netloc for t in targets]
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "stemstream", "static_configs": [{"targets": hosts}]}],
    }
    (work / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = open(work / "prometheus.log", "w")  # noqa: SIM115 (Prometheus's own log, for failures)
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True,
    )  # fmt: skip
    log.close()
    api = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{api}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    if not wait_until(ready, 30, 0.2):
        stop_process(proc)
        raise AssertionError(f"prometheus not ready: {(work / 'prometheus.log').read_text()[-2000:]}")
    return proc, api


def settled(api: str, expr: str, expected: float, timeout: float = 30.0) -> float | None:
    """The query's value once it equals ``expected`` (bounded: the last value otherwise). Scrapes are
    1 s apart and one may time out on a loaded machine (its target reads 0 until the next one)."""
    deadline = time.monotonic() + timeout
    while (got := value(api, expr)) != expected and time.monotonic() < deadline:
        time.sleep(0.25)
    return got


def test_prometheus_has_the_scan_counted_and_no_losses(stack: Stack) -> None:
    api, frames = stack.api, stack.frames_in_file
    assert frames == SCAN.positions
    counted = "sum(stemstream_node_frames_counted_total)"
    assert settled(api, counted, frames) == frames, query(api, "stemstream_node_frames_counted_total")
    # every target up, both nodes up as the aggregator sees them
    up = 'count(up{job="stemstream"} == 1)'
    assert settled(api, up, len(stack.targets)) == len(stack.targets), get_json(f"{api}/api/v1/targets")
    assert value(api, "sum(stemstream_aggregator_node_up)") == 2
    assert value(api, "sum(stemstream_aggregator_sectors_received_total)") == 4 * frames
    assert value(api, "sum(stemstream_aggregator_node_sectors_forwarded_total)") == 4 * frames
    assert value(api, "sum(stemstream_node_sectors_received_total)") == 4 * frames
    losses = [
        "stemstream_aggregator_sectors_late_total",
        "stemstream_aggregator_sectors_malformed_total",
        "stemstream_aggregator_sectors_unroutable_total",
        "stemstream_aggregator_sectors_refused_total",
        "stemstream_node_frames_incomplete_total",
        "stemstream_node_sectors_late_total",
        "stemstream_node_messages_malformed_total",
        "stemstream_writer_messages_malformed_total",
    ]
    for name in losses:
        assert value(api, f"sum({name})") == 0, name
    assert wait_until(lambda: value(api, "stemstream_writer_last_scan_frames_written") == frames, 10)
    assert value(api, "stemstream_writer_last_scan_completeness_ratio") == 1
    assert value(api, 'sum(stemstream_writer_scans_total{status="complete"})') == 1
    assert value(api, "sum(stemstream_writer_hosted)") == 1  # node 0 only
    assert value(api, "stemstream_writer_last_scan_seconds_to_file") >= 0
    assert value(api, "sum(stemstream_node_counting_workers_alive)") == value(
        api, "sum(stemstream_node_counting_workers)"
    )
    assert value(api, "stemstream_view_intake_up") == 1
    assert value(api, "stemstream_view_snapshots_received_total") > 0


def scraped_names(urls: list[str]) -> set[str]:
    """Every sample name the exporters serve now."""
    names: set[str] = set()
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        names |= {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    return names


def test_the_dashboard_queries_what_the_exporters_serve(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    served = scraped_names(list(stack.targets.values()))
    for expr in exprs:
        named = set(re.findall(r"\b(?:stemstream|process)_[a-z0-9_]+\b", expr))
        assert named and named <= served, (expr, named - served)
        # and Prometheus takes it, with Grafana's variables as Grafana would fill them
        answer = query(stack.api, expr.replace("$__rate_interval", "10s").replace("$__range", "5m"))
        assert answer["status"] == "success", (expr, answer)
    panels = {panel["title"] for panel in dashboard["panels"]}
    assert {
        "Frames counted",
        "Sectors by kind (aggregator)",
        "Queue depths",
        "Last scan completeness",
    } <= panels
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
