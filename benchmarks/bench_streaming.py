"""End-to-end streaming on this machine, side by side in one run, with real processes:
`stemstream aggregator` and `stemstream node` processes, four sender threads emulating the receivers.

  b. counted frames/s through send -> aggregator -> 2 nodes -> HDF5 (zero loss), next to stempy's offline
     raw-file counting rate on the same scan (multi-pass reader, all cores);
  c. time from the last sector sent to the final HDF5 on disk, for 64x64 and 256x256 scans, next to the
     file workflow (write raw files, then count them offline) for the same scan;
  d. load balance across 4 nodes: each node's share of frames;
  e. peak RSS (VmHWM) of a node process and of its counting worker, 64x64 vs 256x256.

Usage: python benchmarks/bench_streaming.py [--sizes 64,256] [--file-workflow-max 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zmq

from counting.geometry import ScanShape
from counting.offline import count_raw_scan
from counting.raw import open_raw_scan, write_raw_scan
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import write_counted_scan
from stemstream_testing.options import options
from streaming import protocol as p
from streaming.sender import run_sender
from tasks.processes import rss_kb

RESULTS = Path(__file__).parent / "results"
CLI = [sys.executable, "-m", "flows.cli"]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Pipeline:
    """An aggregator process and n node processes on ipc:// sockets in a scratch directory."""

    def __init__(self, work: Path, n_nodes: int, workers: int):
        self.work = work
        self.out = work / "out"
        ipc = f"ipc://{work}"
        self.receiver = f"{ipc}/receiver"
        self.nodes_addr = f"{ipc}/nodes"
        self.monitor = f"{ipc}/monitor"
        env = {
            **os.environ,
            "STEMSTREAM_STREAMING__NODE_SLOTS": "16",
            "STEMSTREAM_STREAMING__NODE_BATCH": "32",
            "STEMSTREAM_STREAMING__SCAN_DEADLINE": "2",
            "PYTHONUNBUFFERED": "1",
        }
        self.logs = []
        self.procs: list[subprocess.Popen] = []
        self.procs.append(
            self._spawn(
                [
                    "aggregator",
                    "--receivers",
                    self.receiver,
                    "--nodes-bind",
                    self.nodes_addr,
                    "--nodes",
                    str(n_nodes),
                    "--monitor-bind",
                    self.monitor,
                ],
                env,
                "agg",
            )
        )
        writer = f"{ipc}/writer"
        for i in range(n_nodes):
            role = (
                ["--output-dir", str(self.out), "--writer-bind", writer] if i == 0 else ["--writer", writer]
            )
            self.procs.append(
                self._spawn(
                    [
                        "node",
                        "--aggregator",
                        self.nodes_addr,
                        *role,
                        "--name",
                        f"node{i}",
                        "--workers",
                        str(workers),
                    ],
                    env,
                    f"node{i}",
                )
            )
        self.node_pids = [pr.pid for pr in self.procs[1:]]
        self.peak_rss: dict[str, int] = {}
        self._sampling = True
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        self._wait_armed(n_nodes)

    def _spawn(self, args: list[str], env: dict, name: str) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "w")  # noqa: SIM115 - closed in close()
        self.logs.append(log)
        return subprocess.Popen([*CLI, *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.work)

    def _sample(self) -> None:
        while self._sampling:
            for i, pid in enumerate(self.node_pids):
                self.peak_rss[f"node{i}"] = max(self.peak_rss.get(f"node{i}", 0), rss_kb(pid, "VmHWM"))
                for c in _children(pid):
                    key = f"node{i}-worker"
                    self.peak_rss[key] = max(self.peak_rss.get(key, 0), rss_kb(c, "VmHWM"))
            time.sleep(0.1)

    def _wait_armed(self, n: int, timeout: float = 60.0) -> None:
        state = self.last_state(lambda s: s.nodes_ready >= n, timeout)
        if state is None:
            raise RuntimeError(f"nodes not ready; see logs in {self.work}")

    def last_state(self, until, timeout: float) -> p.AggregatorState | None:
        """Read monitor states until ``until(state)`` holds (bounded)."""
        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.monitor)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if sub.poll(200):
                    kind, body = sub.recv_multipart()
                    state = p.decode(kind, body, p.AggregatorState)
                    if until(state):
                        return state
            return None
        finally:
            sub.close(0)

    def send(self, source, scan_number: int) -> tuple[float, float]:
        """Send a scan (a SimulatorConfig, or raw v5 file paths) from four threads, one per module;
        returns (first send, last sector handed to the OS) wall times."""
        sources = [
            SimulatedCamera(source) if isinstance(source, SimulatorConfig) else open_raw_scan(source)
            for _ in range(4)
        ]
        t0 = time.time()
        ends = {}

        def one(m: int) -> None:
            run_sender(sources[m], [self.receiver], m, scan_number=scan_number, send_timeout=120)
            ends[m] = time.time()

        with ThreadPoolExecutor(4) as ex:
            list(ex.map(one, range(4)))
        return t0, max(ends.values())

    def record(self, scan_number: int, timeout: float = 300.0) -> dict:
        """The writer's stop record for a scan (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list(self.out.glob(f"*_{scan_number:05d}.json"))
            if found:
                return json.loads(found[0].read_text())
            time.sleep(0.01)
        raise TimeoutError(f"scan {scan_number} not written; see logs in {self.work}")

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL)."""
        self._sampling = False
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


def stempy_offline_fps(raw_dir: Path) -> float:
    """stempy's raw-file counting (multi-pass, all cores, production threshold sampling)."""
    import stempy.image as stim
    import stempy.io as stio

    files = sorted(str(f) for f in raw_dir.glob("*.data"))
    n = open_raw_scan(files).num_frames
    t0 = time.perf_counter()
    r = stio.reader(files, version=stio.FileVersion.VERSION5, backend="multi-pass", threads=os.cpu_count())
    stim.electron_count(
        r,
        np.zeros((576, 576), np.float32),
        number_of_samples=1200,
        threshold_num_blocks=20,
        background_threshold_n_sigma=4.5,
        xray_threshold_n_sigma=175,
    )
    return n / (time.perf_counter() - t0)


def write_raw(config: SimulatorConfig, work: Path) -> dict:
    """The detector's raw files of a scan, written and synced to disk (the file workflow's first step)."""
    cam = SimulatedCamera(config)
    t0 = time.perf_counter()
    paths = write_raw_scan(work / "raw", 1, cam.scan, cam.iter_batches(64))
    for p_ in paths:  # the detector's files are on disk, not only in the page cache
        with open(p_, "rb+") as fh:
            os.fsync(fh.fileno())
    return {"write_raw_s": time.perf_counter() - t0, "raw_bytes": sum(p_.stat().st_size for p_ in paths)}


def count_offline(raw_dir: Path, work: Path) -> dict:
    """Count the raw files offline into an HDF5 (the file workflow's second step)."""
    t0 = time.perf_counter()
    counted = count_raw_scan(open_raw_scan(sorted(raw_dir.glob("*.data"))), None, options())
    write_counted_scan(work / "offline.h5", counted)
    return {"count_s": time.perf_counter() - t0}


def main() -> None:
    """Run b-e and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--file-workflow-max", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1, help="counting processes per node")
    ap.add_argument("--json", type=Path, default=RESULTS / "streaming.json")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    out: dict = {"cpus": os.cpu_count(), "workers_per_node": a.workers, "scans": {}}
    with tempfile.TemporaryDirectory(prefix="stemstream-bench-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        (tmp / "two").mkdir()
        pipe = Pipeline(tmp / "two", 2, a.workers)
        raw_dirs: dict[int, Path] = {}
        fws: dict[int, dict] = {}
        for k, side in enumerate(sizes):  # the file workflow's first half: the raw files, on disk
            if side <= a.file_workflow_max:
                work = tmp / f"files{side}"
                fws[side] = write_raw(SimulatorConfig(ScanShape(side, side), dose=200.0, seed=k), work)
                raw_dirs[side] = work / "raw"
        try:
            for k, side in enumerate(sizes):
                cfg = SimulatorConfig(ScanShape(side, side), dose=200.0, seed=k)
                # Receivers stream from RAM: raw files in the page cache (zero-copy) when they fit in it,
                # else the simulator (its sectors are copied before sending).
                source = sorted(raw_dirs[side].glob("*.data")) if side in raw_dirs and side <= 128 else cfg
                t_first, t_last = pipe.send(source, scan_number=k + 1)
                rec = pipe.record(k + 1)
                n = side * side
                res = {
                    "frames": n,
                    "source": "raw files (page cache)" if isinstance(source, list) else "simulator",
                    "status": rec["status"],
                    "frames_written": rec["frames_written"],
                    "completeness": rec["completeness"],
                    "send_s": t_last - t_first,
                    "first_sector_to_file_s": rec["written_time"] - t_first,
                    "last_sector_to_file_s": rec["written_time"] - t_last,
                    "counted_fps": n / (rec["written_time"] - t_first),
                    "node_peak_rss_kb": dict(pipe.peak_rss),
                }
                out["scans"][f"{side}x{side}"] = res
                print(
                    f"{side}x{side} ({res['source']}): {n} frames, {res['status']}, "
                    f"{res['counted_fps']:.0f} counted frames/s, last sector -> file "
                    f"{res['last_sector_to_file_s']:.2f} s, peak RSS kB {pipe.peak_rss}"
                )
        finally:
            pipe.close()
        for k, side in enumerate(sizes):  # the file workflow's second half: count the raw files offline
            if side not in raw_dirs:
                continue
            fw = fws[side]
            fw.update(count_offline(raw_dirs[side], tmp / f"files{side}"))
            fw["total_s"] = fw["write_raw_s"] + fw["count_s"]
            r = out["scans"][f"{side}x{side}"]
            r["file_workflow"] = fw
            r["file_workflow_vs_streaming_latency"] = fw["total_s"] / max(r["last_sector_to_file_s"], 1e-9)
            if k == 0:
                out["stempy_offline_fps"] = stempy_offline_fps(raw_dirs[side])
            shutil.rmtree(raw_dirs[side])
            print(
                f"{side}x{side} file workflow: write {fw['write_raw_s']:.1f} s + count {fw['count_s']:.1f} s "
                f"= {fw['total_s']:.1f} s; {r['file_workflow_vs_streaming_latency']:.0f}x the streaming latency"
            )
        first = out["scans"][f"{sizes[0]}x{sizes[0]}"]
        out["streaming_vs_stempy_offline"] = first["counted_fps"] / out["stempy_offline_fps"]
        print(
            f"stempy offline (all cores): {out['stempy_offline_fps']:.0f} frames/s; streaming end to end "
            f"{first['counted_fps']:.0f} frames/s = {out['streaming_vs_stempy_offline']:.1f}x"
        )
        # d: four nodes
        (tmp / "four").mkdir()
        pipe4 = Pipeline(tmp / "four", 4, 0)
        try:
            side = sizes[0]
            pipe4.send(SimulatorConfig(ScanShape(side, side), dose=50.0, seed=9), scan_number=1)
            pipe4.record(1)
            state = pipe4.last_state(lambda s: sum(s.per_node.values()) >= 4 * side * side, 30)
            shares = {k: v / 4 for k, v in (state.per_node if state else {}).items()}  # sectors -> frames
            equal = side * side / 4
            out["load_balance_4_nodes"] = {
                "frames_per_node": shares,
                "max_deviation_pct": max(abs(v - equal) / equal * 100 for v in shares.values())
                if shares
                else None,
            }
            print(f"4 nodes: frames per node {shares}")
        finally:
            pipe4.close()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
