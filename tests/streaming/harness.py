"""In-process streaming session for tests: a real aggregator and real node streamers on loopback sockets,
each in a thread, and senders in threads (all four modules start together). Everything is stopped."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from counting.kernel import Thresholds
from counting.settings import CountingSettings
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import CountedScan, read_counted_scan
from streaming.aggregator.aggregator import Aggregator
from streaming.camera.faults import SenderFaults
from streaming.camera.sender import SendResult, run_sender
from streaming.components import node_config, server_curve
from streaming.node.streamer import NodeCounters, NodeStreamer
from streaming.settings import StreamingSettings


@dataclass
class Session:
    """An aggregator and its nodes, running."""

    aggregator: Aggregator
    nodes: list[NodeStreamer]
    output_dir: Path
    threads: list[threading.Thread] = field(default_factory=list)
    results: dict[str, NodeCounters] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def send(
        self,
        config: SimulatorConfig,
        scan_number: int,
        faults: SenderFaults | None = None,
        rate: float | None = None,
    ) -> list[SendResult]:
        """Send a simulated scan from four sender threads that start together."""
        cams = [SimulatedCamera(config) for _ in range(4)]
        with ThreadPoolExecutor(4) as ex:
            return list(
                ex.map(
                    lambda m: run_sender(
                        cams[m],
                        self.aggregator.receiver_endpoints,
                        m,
                        rate=rate,
                        scan_number=scan_number,
                        faults=faults,
                        send_timeout=30,
                    ),
                    range(4),
                )
            )

    def wait_for_file(self, scan_number: int, timeout: float = 30.0) -> Path:
        """The scan's HDF5, once its stop record exists (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = sorted(self.output_dir.glob(f"*_{scan_number:05d}.json"))
            if found:
                return found[0].with_suffix(".h5")
            time.sleep(0.02)
        raise TimeoutError(f"scan {scan_number} was not written within {timeout} s")

    def counted(self, scan_number: int, timeout: float = 30.0) -> CountedScan:
        """Read the written scan."""
        return read_counted_scan(self.wait_for_file(scan_number, timeout))

    def close(self) -> None:
        """Stop nodes, then the aggregator; join every thread."""
        for n in self.nodes:
            n.stop()
        self.stop.set()
        for t in self.threads:
            t.join(20)
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"threads still running: {alive}"


def stream_settings(**overrides: object) -> StreamingSettings:
    """Streaming settings for a loopback test session: free ports, short timers, small batches."""
    values: dict = dict(
        receivers=["tcp://127.0.0.1:0"],
        nodes_bind="tcp://127.0.0.1:0",
        monitor_bind="tcp://127.0.0.1:0",
        writer_bind="tcp://127.0.0.1:0",
        scan_deadline=1.0,
        heartbeat=0.2,
        node_workers=0,
        node_batch=8,
        node_slots=64,
        node_deadline=10.0,
        frame_timeout=5.0,
        writer_deadline=10.0,
    )
    values.update(overrides)
    return StreamingSettings(**values)


def counting_settings(fixed: Thresholds | None = None) -> CountingSettings:
    """Counting settings, with fixed thresholds or estimated ones."""
    if fixed is None:
        return CountingSettings()
    return CountingSettings(background_threshold=fixed.background, xray_threshold=fixed.xray)


def start_session(
    tmp: Path,
    n_nodes: int = 2,
    fixed: Thresholds | None = None,
    workers: int = 0,
    scan_deadline: float = 1.0,
    node_overrides: dict | None = None,
    agg_overrides: dict | None = None,
) -> Session:
    """Start an aggregator and n node streamers, all configured alike: the aggregator picks node 0, which
    hosts the writer. node_overrides, agg_overrides: more streaming settings for the nodes, the aggregator."""
    agg_st = stream_settings(n_nodes=n_nodes, scan_deadline=scan_deadline, **(agg_overrides or {}))
    agg = Aggregator(agg_st, server_curve(agg_st.curve))  # CURVE when its key files are set
    out = tmp / "out"
    st = stream_settings(node_workers=workers, **(node_overrides or {}))
    nodes = [
        NodeStreamer(
            node_config(
                st, counting_settings(fixed), aggregator=agg.nodes_endpoint, output_dir=out, name=f"node{i}"
            ),
            None,
        )
        for i in range(n_nodes)
    ]
    session = Session(agg, nodes, out)
    t = threading.Thread(target=agg.run, kwargs={"stop_event": session.stop}, name="aggregator", daemon=True)
    session.threads.append(t)
    for node in nodes:
        session.threads.append(
            threading.Thread(
                target=lambda n=node: session.results.__setitem__(n.config.name, n.run()),
                name=node.config.name,
                daemon=True,
            )
        )
    for t in session.threads:
        t.start()
    deadline = time.monotonic() + 10
    while agg.state().nodes_ready < n_nodes:
        if time.monotonic() > deadline:
            session.close()
            raise TimeoutError("nodes did not become ready")
        time.sleep(0.02)
    return session
