"""End-to-end streaming on this machine, side by side in one run, with real processes:
`stemstream aggregator` and two `stemstream node` processes (one counting worker each, ipc://), four sender
threads here emulating the receivers (simulated camera, one per thread), all on this machine.

  a. per-scan overhead: first sector -> file on disk for a 16x16 scan (the session's first scan, and the
     median of the next ones) next to 64x64;
  b. counted frames/s end to end (first sector -> file) at 32x32, 64x64 and 256x256, each as a fraction of
     the 256x256 rate (target >= 80 %) and as a multiple of stempy's offline counting of raw files of the
     same scan, measured in the same run (target >= 4x; above 64x64 against stempy's best rate);
  c. a 512x512 scan (262,144 frames): complete, last sector -> file (target <= 3 s), and the peak memory of
     the writer's host (node 0) and of the other node during it, against the same figures for 64x64
     (target: within 10 %): VmRSS (with the fixed shared slot memory) and RssAnon (private memory alone);
     and, to see the writer's own memory apart from the nodes' bounded queues (whose filling depends on how
     long back-pressure lasts, not on the scan's size), a scan writer alone in a process, fed the counted
     events of a 64x64 and of a 512x512 scan (200 events/frame, two nodes' batches of 32) at --writer-rate;
  d. load balance across 4 nodes: each node's share of frames;
  e. the file workflow for 64x64: write the raw files, then count them offline.

Small scans are repeated (--repeats) and their median reported; the machine's load average is recorded
before and after, since other load on a shared machine moves absolute rates.

Usage: python benchmarks/bench_streaming.py [--sizes 32,64,256] [--big 512] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import zmq

# stemstream_testing (test support) is not installed: import it from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from counting.geometry import ALL_SECTORS, ScanShape  # noqa: E402
from counting.offline import count_raw_scan  # noqa: E402
from counting.raw import open_raw_scan, write_raw_scan  # noqa: E402
from counting.simulator import SimulatedCamera, SimulatorConfig  # noqa: E402
from counting.sparse import write_counted_scan  # noqa: E402
from stemstream_testing.options import options  # noqa: E402
from stemstream_testing.pipeline import ProcessPipeline  # noqa: E402
from streaming.protocol import control as p  # noqa: E402
from streaming.protocol.record import ScanRecord  # noqa: E402
from tasks.launch.processes import process_tree, rss_kb  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DOSE = 200.0


def pipeline(work: Path, n_nodes: int, workers: int) -> ProcessPipeline:
    """An aggregator and n node processes (workers counting processes each) on ipc:// sockets in work."""
    streaming = {"node_slots": 16, "node_batch": 32, "scan_deadline": 2.0, "node_workers": workers}
    return ProcessPipeline(
        work, n_nodes, transport="ipc", streaming=streaming, names="node{}", rss_interval=5.0
    )


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of a process's threads, by kind: its main thread (the Python loop: "main"),
    ZeroMQ's I/O threads ("zmq-io": the kernel's socket copies, CURVE) and the others ("other")."""
    out = dict.fromkeys(("main", "zmq-io", "other"), 0.0)
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text()
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                kind = "main" if tid == str(pid) else "zmq-io" if comm.startswith("ZMQbg/IO") else "other"
                out[kind] += (int(fields[11]) + int(fields[12])) / _TICK
    return out


def pipeline_cpu(pipe: ProcessPipeline) -> dict[str, float]:
    """CPU seconds so far of the aggregator, each node and its workers, and the sender threads (this process
    but its main thread, which makes the simulated cameras before each scan's clock starts); and of the
    aggregator's and nodes' threads by kind ("node0.main", "node0.zmq-io", ...)."""
    out = {"senders": sum(os.times()[:2]) - time.thread_time()}
    for name, proc in pipe.procs.items():
        main, *workers = process_tree(proc.pid)
        out[name] = cpu_seconds(main)
        out.update({f"{name}.{k}": v for k, v in thread_cpu(main).items()})
        if workers:
            out[f"{name}-workers"] = sum(cpu_seconds(w) for w in workers)
    return out


class ScanMemory:
    """Peak VmRSS and RssAnon (kB) of each node process (and its workers) while a scan runs.

    VmRSS peaks come from the kernel's own high-water mark (VmHWM, reset at the start through clear_refs),
    so they are exact without fast sampling; RssAnon has no such mark and is sampled every interval. The
    sampling runs on the same cores as the pipeline, so it is kept sparse.
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.25) -> None:
        self.pids, self.interval = pids, interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ScanMemory:
        for _, pids in self._groups():
            for pid in pids:
                with contextlib.suppress(OSError):  # not allowed here: the sampled peak stands
                    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()
        for key, pids in self._groups():
            k = f"{key} VmRSS"
            self.peak[k] = max(self.peak.get(k, 0), sum(rss_kb(q, "VmHWM") for q in pids))

    def _groups(self) -> list[tuple[str, list[int]]]:
        groups = []
        for name, pid in self.pids.items():
            node, *workers = process_tree(pid)
            groups += [(name, [node]), (f"{name}-worker", workers)]
        return groups

    def _sample(self) -> None:
        for key, pids in self._groups():
            for field in ("VmRSS", "RssAnon"):
                k = f"{key} {field}"
                self.peak[k] = max(self.peak.get(k, 0), sum(rss_kb(q, field) for q in pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)


def stream_scan(pipe: ProcessPipeline, side: int, number: int, seed: int, nodes: dict[str, int]) -> dict:
    """One simulated scan through the pipeline; its timings (from the stop record), losses and memory."""
    config = SimulatorConfig(ScanShape(side, side), dose=DOSE, seed=seed)  # a camera per sender thread
    pipe.wait_armed(2, 60)
    cpu0 = pipeline_cpu(pipe)
    with ScanMemory(nodes) as memory:
        sent = pipe.send(config, scan_number=number, send_timeout=300)
        rec, h5 = pipe.record(number, timeout=1200)
    cpu1 = pipeline_cpu(pipe)
    n = side * side
    first_to_file = rec.written_time - sent.started
    per_frame = {k: 1e3 * (cpu1[k] - cpu0.get(k, 0.0)) / n for k in cpu1}
    cpu = {k: v for k, v in per_frame.items() if "." not in k}
    threads = {k: v for k, v in per_frame.items() if "." in k}
    with h5py.File(h5) as f:  # what the nodes had to drop, if anything (overload: frames sealed incomplete)
        provenance = dict(f["metadata/stemstream"].attrs)
    return {
        "side": side,
        "frames": n,
        "status": str(rec.status),
        "frames_written": rec.frames_written,
        "completeness": rec.completeness,
        "late_sectors": int(provenance.get("late_sectors", 0)),
        "evicted_batches": int(provenance.get("evicted_batches", 0)),
        "send_s": sent.ended - sent.started,
        "first_sector_to_file_s": first_to_file,
        "last_sector_to_file_s": rec.written_time - sent.ended,
        "counted_fps": n / first_to_file,
        "peak_kb": dict(memory.peak),
        "cpu_ms_per_frame": cpu,
        "cpu_ms_per_frame_by_thread": threads,  # the aggregator's and nodes' main (Python) and I/O threads
        "cpu_ms_per_frame_total": sum(cpu.values()),
        # of the machine's CPUs, the share this pipeline (and its senders) had during the scan
        "cpu_share": sum(cpu.values()) * n / 1e3 / (first_to_file * (os.cpu_count() or 1)),
    }


WRITER_PROCESS = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from counting.kernel import Thresholds
from stemstream_testing.options import estimation
from streaming.writer.writer import ScanWriter, WriterConfig
config = WriterConfig(Path(sys.argv[1]), 0, "scan_{scan:05d}.h5", "UTC", Thresholds(30.5, 600.0), estimation(), 60.0)
writer = ScanWriter("tcp://127.0.0.1:0", config, None).start()
print(writer.endpoint, flush=True)
sys.stdin.read()  # until the benchmark closes it
writer.stop()
"""


def writer_alone(work: Path, side: int, rate: float, events_per_frame: int = 200) -> dict:
    """A scan writer in a process of its own, fed one scan's counted events as two nodes send them (batches
    of 32, frames alternating between the nodes) at ``rate`` frames/s: its peak memory and end latency."""
    import subprocess

    repo = str(Path(__file__).resolve().parents[1])
    out = work / f"writer{side}"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_PROCESS, str(out), repo], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    ctx = zmq.Context()
    socks = []
    try:
        endpoint = proc.stdout.readline().decode().strip()
        rng = np.random.default_rng(0)
        pool = [rng.integers(0, 576 * 576, 32 * events_per_frame).astype(np.uint32) for _ in range(8)]
        offsets = (np.arange(33) * events_per_frame).astype(np.int64)
        masks = np.full(32, ALL_SECTORS, np.uint8)
        for k in range(2):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(endpoint)
            sock.send_multipart(p.encode(p.NodeScanBegin(f"n{k}", 1, side, side, 2, k)))
            socks.append(sock)
        n = side * side
        with ScanMemory({"writer": proc.pid}) as memory:
            t0 = time.perf_counter()
            for b, start in enumerate(range(0, n, 64)):
                for k, sock in enumerate(socks):
                    numbers = np.arange(start + k, min(start + 64, n), 2, dtype=np.int64)
                    m = len(numbers)
                    sock.send_multipart(
                        [
                            *p.encode(p.EventsHeader(f"n{k}", 1, m)),
                            numbers,
                            numbers,
                            masks[:m],
                            offsets[: m + 1],
                            pool[b % len(pool)][: m * events_per_frame],
                        ]
                    )
                ahead = (start + 64) / rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            for k, sock in enumerate(socks):
                sock.send_multipart(p.encode(p.NodeScanDone(f"n{k}", 1, 2 * n, 2 * n, n // 2, 0, 0, "end")))
            sent = time.time()
            deadline = time.monotonic() + 300
            while not (out / "scan_00001.json").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            record = ScanRecord.load(out / "scan_00001.json")
        hwm = rss_kb(proc.pid, "VmHWM")
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
        proc.stdin.close()
        proc.wait(60)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "frames": n,
        "status": str(record.status),
        "file_bytes": record.events * 4,
        "last_events_to_file_s": record.written_time - sent,
        "peak_rss_kb": memory.peak["writer VmRSS"],
        "peak_rss_anon_kb": memory.peak["writer RssAnon"],
        "vm_hwm_kb": hwm,
    }


def median_of(runs: list[dict]) -> dict:
    """The run with the median counted rate, with every run's figures alongside."""
    ranked = sorted(runs, key=lambda r: r["counted_fps"])
    out = dict(ranked[len(ranked) // 2])
    out["runs_fps"] = [round(r["counted_fps"], 1) for r in runs]
    out["runs_first_sector_to_file_s"] = [round(r["first_sector_to_file_s"], 3) for r in runs]
    return out


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


def writer_host(pipe: ProcessPipeline) -> str:
    """The node that hosts the scan writer (node 0 as the aggregator numbers them)."""
    return next(name for name in list(pipe.procs)[1:] if "hosting the scan writer" in pipe.log(name))


def run(a: argparse.Namespace, tmp: Path) -> dict:
    sizes = [int(s) for s in a.sizes.split(",")]
    out: dict = {
        "cpus": os.cpu_count(),
        "workers_per_node": a.workers,
        "dose": DOSE,
        "load_average_before": os.getloadavg(),
        "writer_rate": a.writer_rate,
        "scans": {},
    }
    # The offline side first (raw files for stempy and the file workflow), while nothing else runs.
    raw: dict[int, Path] = {}
    for side in sorted({s for s in sizes if s <= a.stempy_max} | {64}):
        work = tmp / f"files{side}"
        fw = write_raw(SimulatorConfig(ScanShape(side, side), dose=DOSE, seed=side), work)
        raw[side] = work / "raw"
        stempy = stempy_offline_fps(raw[side])
        out.setdefault("stempy_offline_fps", {})[f"{side}x{side}"] = stempy
        print(f"stempy offline {side}x{side}: {stempy:.0f} frames/s")
        if side == 64:
            fw.update(count_offline(raw[side], work))
            fw["total_s"] = fw["write_raw_s"] + fw["count_s"]
            out["file_workflow_64x64"] = fw
        shutil.rmtree(raw[side])
    warm = SimulatedCamera(SimulatorConfig(ScanShape(2, 2), seed=0))
    warm.frame(warm.frame_numbers[0])  # the senders' simulator, compiled before the first scan

    pipe = pipeline(tmp / "two", 2, a.workers)
    number = 0

    def scan(side: int) -> dict:
        nonlocal number
        number += 1
        r = stream_scan(pipe, side, number, number, nodes)
        print(
            f"  scan {number}: {side}x{side} {r['status']} ({100 * r['completeness']:.1f} %, "
            f"{r['evicted_batches']} batches sealed incomplete), {r['counted_fps']:.0f} frames/s, first sector -> "
            f"file {r['first_sector_to_file_s']:.3f} s, last sector -> file {r['last_sector_to_file_s']:.3f} s; "
            f"CPU share {100 * r['cpu_share']:.0f} %, CPU ms/frame {r['cpu_ms_per_frame_total']:.3f} "
            "(target <= 1.0): "
            + " ".join(f"{k} {v:.3f}" for k, v in r["cpu_ms_per_frame"].items())
            + "; by thread: "
            + " ".join(f"{k} {v:.3f}" for k, v in r["cpu_ms_per_frame_by_thread"].items() if v)
        )
        return r

    try:
        nodes = {name: proc.pid for name, proc in list(pipe.procs.items())[1:]}
        host = writer_host(pipe)
        out["writer_host"] = host
        # a: the session's first scan is a 16x16, then more of them, then 64x64
        small = [scan(16) for _ in range(a.repeats + 1)]
        out["scans"]["16x16"] = median_of(small[1:])
        out["scans"]["16x16"]["first_scan_of_session"] = small[0]
        for side in sizes:
            runs = [scan(side) for _ in range(a.repeats if side <= 64 else 1)]
            out["scans"][f"{side}x{side}"] = median_of(runs)
        if a.big:
            out["scans"][f"{a.big}x{a.big}"] = median_of([scan(a.big)])
    finally:
        pipe.close()
    out["load_average_after"] = os.getloadavg()
    if a.big:
        alone = {f"{side}x{side}": writer_alone(tmp, side, a.writer_rate) for side in (64, a.big)}
        out["writer_alone"] = alone

    # d: four nodes
    pipe4 = pipeline(tmp / "four", 4, 0)
    try:
        side = 32
        pipe4.send(SimulatorConfig(ScanShape(side, side), dose=50.0, seed=9), scan_number=1)
        pipe4.record(1)
        try:
            state = pipe4.wait_state(lambda s: sum(s.per_node.values()) >= 4 * side * side, 30)
        except TimeoutError:
            state = None
        shares = {k: v / 4 for k, v in (state.per_node if state else {}).items()}  # sectors -> frames
        equal = side * side / 4
        out["load_balance_4_nodes"] = {
            "frames_per_node": shares,
            "max_deviation_pct": max(abs(v - equal) / equal * 100 for v in shares.values())
            if shares
            else None,
        }
    finally:
        pipe4.close()
    return out


def summarize(out: dict, big: int) -> list[str]:
    """Ratios and the table, as printed."""
    scans = out["scans"]
    base = scans["256x256"]["counted_fps"] if "256x256" in scans else None
    stempy = out["stempy_offline_fps"]
    best_stempy = max(stempy.values())
    lines = [
        f"load average before {out['load_average_before'][0]:.1f}, after {out['load_average_after'][0]:.1f} "
        f"({out['cpus']} CPUs); writer host {out['writer_host']}",
        "| scan | frames | counted frames/s | vs 256x256 | vs stempy offline (target >= 5x) | first sector -> "
        "file | last sector -> file | CPU-ms/frame (target <= 1.0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in scans.items():
        ref = stempy.get(key, best_stempy)
        r["vs_256x256"] = r["counted_fps"] / base if base else None
        r["vs_stempy_offline"] = r["counted_fps"] / ref
        lines.append(
            f"| {key} | {r['frames']:,} | {r['counted_fps']:,.0f} | "
            + (f"{100 * r['vs_256x256']:.0f} %" if base else "")
            + f" | {r['vs_stempy_offline']:.1f}x | {r['first_sector_to_file_s']:.2f} s | "
            f"{r['last_sector_to_file_s']:.2f} s | {r.get('cpu_ms_per_frame_total', float('nan')):.2f} |"
        )
    first = scans["16x16"]["first_scan_of_session"]
    lines.append(
        f"per-scan overhead: first sector -> file 16x16 {scans['16x16']['first_sector_to_file_s']:.3f} s "
        f"(the session's first scan {first['first_sector_to_file_s']:.3f} s), 64x64 "
        f"{scans['64x64']['first_sector_to_file_s']:.3f} s"
    )
    lines.append("stempy offline: " + ", ".join(f"{k} {v:.0f} frames/s" for k, v in stempy.items()))
    key = f"{big}x{big}"
    if big and key in scans:
        r, small = scans[key], scans["64x64"]
        mem = {}
        for proc in (out["writer_host"], next(n for n in ("node0", "node1") if n != out["writer_host"])):
            for field in ("VmRSS", "RssAnon"):
                k = f"{proc} {field}"
                mem[k] = {"64x64_kb": small["peak_kb"][k], f"{key}_kb": r["peak_kb"][k]}
                mem[k]["ratio"] = r["peak_kb"][k] / max(small["peak_kb"][k], 1)
        out["memory_64_vs_big"] = mem
        lines.append(
            f"{key}: {r['status']} ({100 * r['completeness']:.2f} % of sectors), {r['frames_written']:,} of "
            f"{r['frames']:,} frames, last sector -> file {r['last_sector_to_file_s']:.2f} s"
        )
        for k, m in mem.items():
            role = " (writer host)" if k.startswith(out["writer_host"]) else ""
            lines.append(
                f"  peak {k}{role}: 64x64 {m['64x64_kb'] / 1024:.0f} MB, {key} {m[f'{key}_kb'] / 1024:.0f} MB "
                f"({100 * (m['ratio'] - 1):+.1f} %)"
            )
    alone = out.get("writer_alone")
    if alone:
        small, large = alone["64x64"], alone[key]
        for k in ("peak_rss_kb", "peak_rss_anon_kb"):
            large[f"{k}_vs_64x64"] = large[k] / small[k]
        lines.append(
            f"writer alone (fed at {out.get('writer_rate', 0):.0f} frames/s): peak VmRSS 64x64 "
            f"{small['peak_rss_kb'] / 1024:.0f} MB, {key} {large['peak_rss_kb'] / 1024:.0f} MB "
            f"({100 * (large['peak_rss_kb_vs_64x64'] - 1):+.1f} %); RssAnon {small['peak_rss_anon_kb'] / 1024:.0f} "
            f"-> {large['peak_rss_anon_kb'] / 1024:.0f} MB ({100 * (large['peak_rss_anon_kb_vs_64x64'] - 1):+.1f} %); "
            f"{key} file {large['file_bytes'] / 1e6:.0f} MB of events on disk "
            f"{large['last_events_to_file_s']:.2f} s after its last events"
        )
    fw = out.get("file_workflow_64x64")
    if fw:
        latency = scans["64x64"]["last_sector_to_file_s"]
        fw["vs_streaming_latency"] = fw["total_s"] / max(latency, 1e-9)
        lines.append(
            f"64x64 file workflow: write {fw['write_raw_s']:.1f} s + count {fw['count_s']:.1f} s = "
            f"{fw['total_s']:.1f} s; {fw['vs_streaming_latency']:.0f}x the streaming latency"
        )
    lb = out.get("load_balance_4_nodes", {})
    lines.append(f"4 nodes: frames per node {lb.get('frames_per_node')}")
    return lines


def main() -> None:
    """Run a-e, print the table and ratios, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,64,256", help="scan sides for the rate comparison")
    ap.add_argument("--big", type=int, default=512, help="side of the large scan (0: none)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each scan up to 64x64 (median)")
    ap.add_argument("--stempy-max", type=int, default=64, help="largest side stempy counts offline")
    ap.add_argument("--workers", type=int, default=1, help="counting processes per node")
    ap.add_argument("--writer-rate", type=float, default=5000.0, help="frames/s fed to the writer alone")
    ap.add_argument("--json", type=Path, default=RESULTS / "streaming.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stemstream-bench-", dir="/tmp") as tmp:
        out = run(a, Path(tmp))
    lines = summarize(out, a.big)
    print("\n".join(lines))
    out["table"] = lines
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
