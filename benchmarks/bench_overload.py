"""Overload: the camera in real time at 1x, 1.5x and 2x the rate the pipeline sustains on this machine.

Real processes: `stemstream aggregator` and two `stemstream node` (CLI, loopback TCP), four real-time sender
threads here emulating the receivers. The sustainable rate R is measured first, in the same run, with a
back-pressured scan (counted frames/s from its stop record). Then per factor, a real-time scan at factor x R:
sectors lost (dropped by the receivers because the aggregator did not take them in time, counted lost
downstream, and any missing from the file that nothing counted), completeness, frames/s the pipeline
took, and the peak summed VmRSS of the aggregator, nodes and counting workers (sampled every 50 ms).

Usage: python benchmarks/bench_overload.py [--side 128] [--factors 1,1.5,2] [--frame-timeout 5]
       [--receiver-hwm 1000] [--node-hwm 2000] [--sender-hwm 1000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from counting.geometry import FRAME_BYTES, N_SECTORS, ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import read_counted_scan
from streaming import protocol as p
from streaming.push_socket import DEFAULT_HWM
from streaming.scan_sender import send_simulated_scan
from streaming.sender import SendResult
from streaming.settings import StreamingSettings
from tasks.plan import free_port
from tasks.processes import process_tree, rss_kb

RESULTS = Path(__file__).parent / "results"
CLI = [sys.executable, "-m", "flows.cli"]
MB = 1 << 20


class Pipeline:
    """An aggregator and two node processes from the CLI; a monitor reader and an RSS sampler thread."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.out = work, work / "out"
        self.receiver, nodes, monitor, writer = (f"tcp://127.0.0.1:{free_port()}" for _ in range(4))
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.logs: list = []
        self.procs = [
            self._spawn(
                ["aggregator", "--receivers", self.receiver, "--nodes-bind", nodes, "--nodes", "2"]
                + ["--monitor-bind", monitor],
                "agg",
            ),
            self._spawn(
                ["node", "--aggregator", nodes, "--output-dir", str(self.out), "--writer-bind", writer]
                + ["--background-threshold", "30.5", "--xray-threshold", "600", "--name", "n0"],
                "n0",
            ),
            self._spawn(["node", "--aggregator", nodes, "--writer", writer, "--name", "n1"], "n1"),
        ]
        self.state: p.AggregatorState | None = None
        self.peak = 0
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(monitor)
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._watch, self._sample)]
        for t in self._threads:
            t.start()
        self.wait_state(lambda s: s.nodes_ready == 2, 60)

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "w")  # noqa: SIM115 - closed in close()
        self.logs.append(log)
        return subprocess.Popen(
            [*CLI, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.work
        )

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self._sub.poll(100):
                kind, body = self._sub.recv_multipart()
                self.state = p.decode(kind, body, p.AggregatorState)

    def rss(self) -> int:
        """Summed VmRSS of every pipeline process (aggregator, nodes, workers) now."""
        return sum(rss_kb(q) * 1024 for pr in self.procs for q in process_tree(pr.pid))

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.rss())

    def wait_state(self, until, timeout: float) -> p.AggregatorState:
        """The first monitor state for which until(state) holds (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state is not None and until(self.state):
                return self.state
            time.sleep(0.02)
        raise TimeoutError(f"monitor condition not met in {timeout} s; logs in {self.work}")

    def record(self, scan_number: int, timeout: float = 300.0) -> tuple[dict, Path]:
        """A scan's stop record and HDF5 (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = sorted(self.out.glob(f"*_{scan_number:05d}.json"))
            if found:
                return json.loads(found[0].read_text()), found[0].with_suffix(".h5")
            time.sleep(0.05)
        raise TimeoutError(f"scan {scan_number} not written; logs in {self.work}")

    def close(self) -> None:
        """Stop the threads and every process (SIGTERM, then SIGKILL)."""
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self._sub.close(linger=0)
        self._ctx.term()
        for pr in self.procs[::-1]:
            pr.terminate()
        for pr in self.procs:
            try:
                pr.wait(15)
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait(5)
        for log in self.logs:
            log.close()


def send(receiver: str, scan: ScanShape, scan_number: int, rate: float | None, hwm: int) -> list[SendResult]:
    """Four receivers (threads) send one simulated scan; real time when a rate is given."""
    camera = SimulatedCamera(SimulatorConfig(scan, dose=100.0, seed=scan_number))
    return send_simulated_scan(
        camera,
        [receiver],
        rate,
        scan_number=scan_number,
        realtime=rate is not None,
        send_timeout=120,
        hwm=hwm,
    )


def run_scan(pipe: Pipeline, scan: ScanShape, number: int, rate: float | None, hwm: int) -> dict:
    """One scan through the pipeline: what was lost where, and memory."""
    before = pipe.wait_state(lambda s: s.nodes_ready == 2, 60)
    warm = pipe.rss()
    pipe.peak = warm
    t0 = time.time()
    results = send(pipe.receiver, scan, number, rate, hwm)
    camera_s = time.time() - t0
    record, h5 = pipe.record(number)
    after = pipe.wait_state(lambda s: s.time > record["written_time"] + 0.3, 30)
    counted = read_counted_scan(h5)
    expected = N_SECTORS * scan.positions
    missing = expected - int(np.unpackbits(counted.sector_masks[..., None], axis=-1).sum())
    lost = {
        "overflowed": sum(r.overflowed for r in results),
        "aggregator": (after.unroutable - before.unroutable)
        + (after.late - before.late)
        + (after.malformed - before.malformed),
        "node_late": int(counted.metadata.get("stemstream", {}).get("late_sectors", 0)),
        "in_transit": record["sectors_lost_in_transit"],
    }
    taken = after.received - before.received
    return {
        "target_fps": rate,
        "camera_fps": scan.positions / camera_s,  # what the emulated camera achieved (it shares the CPUs)
        "taken_fps": taken / N_SECTORS / camera_s,  # frames/s the aggregator took while the camera ran
        "counted_fps": record["frames_written"]
        / max(record["written_time"] - record["first_data_time"], 1e-9),
        "status": record["status"],
        "completeness": record["completeness"],
        "sectors_expected": expected,
        "sectors_missing": missing,
        "loss_pct": 100 * missing / expected,
        "lost": lost,
        "unaccounted": missing - sum(lost.values()),  # must be 0: a loss nothing counted
        "rss_before_mb": warm / MB,
        "rss_peak_mb": pipe.peak / MB,
        "rss_growth_mb": (pipe.peak - warm) / MB,
        "first_sector_to_file_s": record["written_time"] - t0,
    }


def main() -> None:
    """Measure R, then run the real-time scans, print a table and write JSON."""
    defaults = StreamingSettings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=128, help="scan WIDTH=HEIGHT")
    ap.add_argument("--factors", default="1,1.5,2")
    ap.add_argument("--frame-timeout", type=float, default=defaults.frame_timeout)
    ap.add_argument("--receiver-hwm", type=int, default=defaults.aggregator_receiver_hwm)
    ap.add_argument("--node-hwm", type=int, default=defaults.aggregator_node_hwm)
    ap.add_argument("--sender-hwm", type=int, default=DEFAULT_HWM)
    ap.add_argument("--json", type=Path, default=RESULTS / "overload.json")
    a = ap.parse_args()
    env = {
        "STEMSTREAM_STREAMING__AGGREGATOR_RECEIVER_HWM": str(a.receiver_hwm),
        "STEMSTREAM_STREAMING__AGGREGATOR_NODE_HWM": str(a.node_hwm),
        "STEMSTREAM_STREAMING__FRAME_TIMEOUT": str(a.frame_timeout),
        "STEMSTREAM_STREAMING__SCAN_DEADLINE": "1.0",
        "STEMSTREAM_STREAMING__HEARTBEAT": "0.2",
    }
    scan = ScanShape(a.side, a.side)
    out: dict = {
        "cpus": os.cpu_count(),
        "scan": [a.side, a.side],
        "raw_scan_mb": scan.positions * FRAME_BYTES / MB,
        "settings": env | {"sender_hwm": a.sender_hwm},
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="stemstream-overload-", dir="/tmp") as tmp:
        pipe = Pipeline(Path(tmp), env)
        try:
            base = run_scan(pipe, scan, 1, None, a.sender_hwm)
            rate = base["counted_fps"]
            out["sustainable_fps"] = rate
            out["runs"]["back-pressured"] = base
            print(f"R = {rate:.0f} counted frames/s ({base['status']}, {base['loss_pct']:.1f} % lost)")
            for k, factor in enumerate(float(f) for f in a.factors.split(",")):
                r = run_scan(pipe, scan, k + 2, factor * rate, a.sender_hwm)
                out["runs"][f"{factor:g}x"] = r
                print(
                    f"{factor:g}x R ({factor * rate:.0f} frames/s; camera reached {r['camera_fps']:.0f}): "
                    f"{r['loss_pct']:.1f} % of sectors lost {r['lost']}, unaccounted {r['unaccounted']}, "
                    f"pipeline took {r['taken_fps']:.0f} frames/s, RSS {r['rss_before_mb']:.0f} -> peak "
                    f"{r['rss_peak_mb']:.0f} MB",
                    flush=True,
                )
        finally:
            pipe.close()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
