"""In-process streaming session for tests: a real aggregator and real node streamers on loopback sockets,
each in a thread, and senders in threads (all four modules start together). Everything is stopped."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from counting.kernel import Thresholds
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import CountedScan, read_counted_scan
from streaming.aggregator import Aggregator
from streaming.faults import SenderFaults
from streaming.node import NodeConfig, NodeCounters, NodeStreamer
from streaming.sender import SendResult, run_sender


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


def start_session(
    tmp: Path,
    n_nodes: int = 2,
    fixed: Thresholds | None = None,
    workers: int = 0,
    scan_deadline: float = 1.0,
    node_overrides: dict | None = None,
    names: Sequence[str] | None = None,
) -> Session:
    """Start an aggregator and n node streamers; node 0 hosts the writer."""
    agg = Aggregator(
        ["tcp://127.0.0.1:0"],
        "tcp://127.0.0.1:0",
        n_nodes,
        monitor_bind="tcp://127.0.0.1:0",
        scan_deadline=scan_deadline,
        heartbeat=0.2,
    )
    out = tmp / "out"
    options = dict(
        workers=workers,
        batch_size=8,
        slots=64,
        fixed=fixed,
        scan_deadline=10.0,
        frame_timeout=5.0,
        heartbeat=0.2,
        writer_deadline=10.0,
    )
    options.update(node_overrides or {})
    base = NodeConfig(
        agg.nodes_endpoint, name="node0", output_dir=out, writer_bind="tcp://127.0.0.1:0", **options
    )
    head = NodeStreamer(base, None)
    nodes = [head]
    for i in range(1, n_nodes):
        cfg = replace(
            base, name=f"node{i}", output_dir=None, writer=head._writer.endpoint, writer_bind=None, fixed=None
        )
        nodes.append(NodeStreamer(cfg, None))
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
