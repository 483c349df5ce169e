"""Overload: the camera at twice the rate the pipeline sustains. Real processes (an aggregator and two node
streamers from the CLI, with small queues), the four receivers as real-time sender threads here.

A camera cannot wait, so sectors are lost; what matters is that memory stays bounded by the configured
queues and that every lost sector is counted somewhere and marked missing in the file, never silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from counting.geometry import FRAME_BYTES, N_SECTORS, SECTOR_BYTES, ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import read_counted_scan
from streaming import protocol as p
from streaming.aggregator import NODE_SNDHWM, RECEIVER_RCVHWM
from streaming.node import NodeConfig
from streaming.scan_sender import send_simulated_scan
from streaming.sender import SendResult
from streaming.settings import StreamingSettings
from tasks.plan import free_port
from tasks.processes import process_tree, rss_kb

CLI = [sys.executable, "-m", "flows.cli"]
pytestmark = pytest.mark.timeout(150)

# Small queues, so the scan is many times what the pipeline can hold.
RECEIVER_HWM = 8  # aggregator: sectors per receiver connection
NODE_HWM = 16  # aggregator: sectors per node
SLOTS, BATCH = 4, 16  # node: batches in flight, frames per batch
SENDER_HWM = 32  # each receiver's own buffer, in sectors
ENV = {
    "STEMSTREAM_STREAMING__AGGREGATOR_RECEIVER_HWM": str(RECEIVER_HWM),
    "STEMSTREAM_STREAMING__AGGREGATOR_NODE_HWM": str(NODE_HWM),
    "STEMSTREAM_STREAMING__NODE_SLOTS": str(SLOTS),
    "STEMSTREAM_STREAMING__NODE_BATCH": str(BATCH),
    "STEMSTREAM_STREAMING__NODE_WORKERS": "1",
    # Frames that lost a sector never complete; under loss they leave their slot only by this timeout.
    "STEMSTREAM_STREAMING__FRAME_TIMEOUT": "0.2",
    "STEMSTREAM_STREAMING__HEARTBEAT": "0.2",
    "STEMSTREAM_STREAMING__SCAN_DEADLINE": "1.0",
    "PYTHONUNBUFFERED": "1",
}
MEASURE = ScanShape(48, 48)  # back-pressured: the sustainable rate
OVERLOAD = ScanShape(96, 96)  # real time at 2x that rate: 9216 frames, 6.1 GB of raw sectors
MB = 1 << 20


class RssSampler:
    """Samples the summed VmRSS of some process trees every ~50 ms in a thread."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def total(self) -> int:
        """Summed VmRSS of every process in the trees now."""
        return sum(rss_kb(q) * 1024 for pid in self.pids for q in process_tree(pid))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.monotonic(), self.total()))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak(self) -> int:
        """The highest summed sample."""
        return max(v for _, v in self.samples)


class Monitor:
    """Keeps the aggregator's latest monitor state, from a SUB socket read in a thread."""

    def __init__(self, address: str) -> None:
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(address)
        self.state: p.AggregatorState | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sub.poll(100):
                kind, body = self._sub.recv_multipart()
                self.state = p.decode(kind, body, p.AggregatorState)

    def wait(self, until, timeout: float) -> p.AggregatorState:
        """The first state (bounded wait) for which until(state) holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state
            if state is not None and until(state):
                return state
            time.sleep(0.02)
        raise TimeoutError(f"monitor: condition not met in {timeout} s (last state {self.state})")

    def close(self) -> None:
        """Stop the reader thread and close the socket."""
        self._stop.set()
        self._thread.join(5)
        self._sub.close(linger=0)
        self._ctx.term()


def start(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*CLI, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **ENV},
            start_new_session=True,
        )


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def send(receiver: str, scan: ScanShape, scan_number: int, rate: float | None) -> list[SendResult]:
    """Four receivers (threads) send one simulated scan; real time when a rate is given."""
    camera = SimulatedCamera(SimulatorConfig(scan, dose=100.0, seed=scan_number))
    return send_simulated_scan(
        camera,
        [receiver],
        rate,
        scan_number=scan_number,
        realtime=rate is not None,
        send_timeout=60,
        hwm=SENDER_HWM,
    )


def wait_record(out: Path, scan_number: int, logs_dir: Path, timeout: float = 60.0) -> tuple[dict, Path]:
    """The stop record and HDF5 of a scan (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(out.glob(f"*_{scan_number:05d}.json"))
        if found:
            return json.loads(found[0].read_text()), found[0].with_suffix(".h5")
        time.sleep(0.05)
    raise TimeoutError(f"scan {scan_number} not written in {timeout} s: {logs(logs_dir)}")


def logs(where: Path) -> dict[str, str]:
    """The end of each process's log, for failure messages."""
    return {f.name: f.read_text()[-1500:] for f in sorted(where.glob("*.log"))}


def memory_bound(n_nodes: int) -> int:
    """Bytes the configured queues may hold: aggregator receiver and node queues, each node's socket,
    hold queue and slots (slots are shared memory, counted in both the node and its worker's VmRSS)."""
    hold = next(f.default for f in dataclasses.fields(NodeConfig) if f.name == "hold_limit")
    sector = SECTOR_BYTES + 64  # payload plus header
    aggregator = (RECEIVER_HWM * N_SECTORS + NODE_HWM * n_nodes) * sector
    node = (4 * BATCH + hold) * sector + 2 * SLOTS * BATCH * FRAME_BYTES  # rcvhwm is 4 batches
    return aggregator + n_nodes * node


def test_settings_default_to_the_aggregator_constants() -> None:
    s = StreamingSettings()
    assert (s.aggregator_receiver_hwm, s.aggregator_node_hwm) == (RECEIVER_RCVHWM, NODE_SNDHWM)


@pytest.mark.slow
def test_camera_at_twice_the_sustainable_rate(tmp_path: Path) -> None:
    recv, nodes, mon, writer = (f"tcp://127.0.0.1:{free_port()}" for _ in range(4))
    thresholds = ["--background-threshold", "30.5", "--xray-threshold", "600"]
    agg_args = ["aggregator", "--receivers", recv, "--nodes-bind", nodes, "--nodes", "2"]
    procs = [start([*agg_args, "--monitor-bind", mon], tmp_path / "agg.log", tmp_path)]
    monitor = None
    try:
        head = ["--output-dir", "out", "--writer-bind", writer, *thresholds]
        procs.append(
            start(["node", "--aggregator", nodes, *head, "--name", "n0"], tmp_path / "n0.log", tmp_path)
        )
        procs.append(
            start(
                ["node", "--aggregator", nodes, "--writer", writer, "--name", "n1"],
                tmp_path / "n1.log",
                tmp_path,
            )
        )
        monitor = Monitor(mon)
        monitor.wait(lambda s: s.nodes_ready == 2, timeout=60)
        rss = RssSampler([pr.pid for pr in procs])
        idle = rss.total()

        # 1. Back-pressured: nothing lost; the counted rate is what the pipeline sustains here, now.
        results = send(recv, MEASURE, 1, None)
        record, _ = wait_record(tmp_path / "out", 1, tmp_path)
        assert record["status"] == "complete" and sum(r.overflowed for r in results) == 0, (
            record,
            logs(tmp_path),
        )
        rate = record["frames_written"] / (record["written_time"] - record["first_data_time"])
        before = monitor.wait(lambda s: s.nodes_ready == 2 and s.received == 4 * MEASURE.positions, 20)
        assert before.unroutable == before.late == before.malformed == 0

        # 2. Real time at twice that rate, far longer than the queues: sectors must be lost, counted.
        # Memory is measured from here: scan 1 warmed up the counting workers (their one-time JIT and
        # buffers are not queues) and already filled the queues once under back-pressure.
        warm = rss.total()
        with rss:
            t0 = time.monotonic()
            results = send(recv, OVERLOAD, 2, 2 * rate)
            camera_s = time.monotonic() - t0
            record, h5 = wait_record(tmp_path / "out", 2, tmp_path)
            written = record["written_time"]
            after = monitor.wait(lambda s: s.time > written + 0.3, 10)  # counters after the scan ended
    finally:
        if monitor is not None:
            monitor.close()
        stop(procs)
    assert all(pr.returncode is not None for pr in procs)

    expected = 4 * OVERLOAD.positions
    overflowed = sum(r.overflowed for r in results)
    sent = sum(r.sent for r in results)
    assert sent + overflowed == expected and overflowed > 0  # the overload really happened
    counted = read_counted_scan(h5)
    assert counted.sector_masks.shape == (OVERLOAD.positions, 1)  # positions that never arrived: mask 0
    missing = expected - int(np.unpackbits(counted.sector_masks[..., None], axis=-1).sum())
    stats = counted.metadata["stemstream"]
    aggregator_lost = (after.unroutable - before.unroutable) + (after.late - before.late)
    aggregator_lost += after.malformed - before.malformed
    node_late = int(stats["late_sectors"])
    in_transit = record["sectors_lost_in_transit"]
    assert after.received - before.received == sent  # every sector a receiver sent reached the aggregator
    # Every sector missing from the file is one the system counted as lost somewhere: none silently.
    counts = dict(
        overflowed=overflowed, aggregator=aggregator_lost, node_late=node_late, in_transit=in_transit
    )
    finals = [line for text in logs(tmp_path).values() for line in text.splitlines() if "finished" in line]
    assert missing == sum(counts.values()), f"{missing} missing, counted {counts}; {finals}"
    assert record["status"] == "incomplete" and record["completeness"] < 1
    assert record["completeness"] == pytest.approx(1 - missing / expected)

    # Memory: bounded by the configured queues, not by the scan.
    bound = memory_bound(2) + 128 * MB  # margin: allocator slack, Python objects, counted events
    growth = rss.peak - warm
    raw = OVERLOAD.positions * FRAME_BYTES
    print(
        f"R {rate:.0f} frames/s; camera at {2 * rate:.0f} frames/s for {camera_s:.1f} s: "
        f"{overflowed} sectors overflowed, {aggregator_lost} aggregator, {node_late} node late, "
        f"{in_transit} in transit; {missing} of {expected} missing ({100 * missing / expected:.1f} %); "
        f"RSS idle {idle / MB:.0f} MB, before scan 2 {warm / MB:.0f} MB, peak {rss.peak / MB:.0f} MB "
        f"(growth {growth / MB:.0f} MB, bound {bound / MB:.0f} MB, raw scan {raw / MB:.0f} MB)"
    )
    assert growth < bound < raw / 4
