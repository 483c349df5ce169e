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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# stemstream_testing (test support) is not installed: import it from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from counting.geometry import ScanShape  # noqa: E402
from counting.offline import count_raw_scan  # noqa: E402
from counting.raw import open_raw_scan, write_raw_scan  # noqa: E402
from counting.simulator import SimulatedCamera, SimulatorConfig  # noqa: E402
from counting.sparse import write_counted_scan  # noqa: E402
from stemstream_testing.options import options  # noqa: E402
from stemstream_testing.pipeline import ProcessPipeline  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def pipeline(work: Path, n_nodes: int, workers: int) -> ProcessPipeline:
    """An aggregator and n node processes (workers counting processes each) on ipc:// sockets in work."""
    streaming = {"node_slots": 16, "node_batch": 32, "scan_deadline": 2.0, "node_workers": workers}
    return ProcessPipeline(
        work, n_nodes, transport="ipc", streaming=streaming, names="node{}", rss_interval=0.1
    )


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
        pipe = pipeline(tmp / "two", 2, a.workers)
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
                sent = pipe.send(source, scan_number=k + 1)
                t_first, t_last = sent.started, sent.ended
                rec, _ = pipe.record(k + 1)
                n = side * side
                res = {
                    "frames": n,
                    "source": "raw files (page cache)" if isinstance(source, list) else "simulator",
                    "status": str(rec.status),
                    "frames_written": rec.frames_written,
                    "completeness": rec.completeness,
                    "send_s": t_last - t_first,
                    "first_sector_to_file_s": rec.written_time - t_first,
                    "last_sector_to_file_s": rec.written_time - t_last,
                    "counted_fps": n / (rec.written_time - t_first),
                    "node_peak_rss_kb": dict(pipe.memory.hwm_kb),
                }
                out["scans"][f"{side}x{side}"] = res
                print(
                    f"{side}x{side} ({res['source']}): {n} frames, {res['status']}, "
                    f"{res['counted_fps']:.0f} counted frames/s, last sector -> file "
                    f"{res['last_sector_to_file_s']:.2f} s, peak RSS kB {pipe.memory.hwm_kb}"
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
        pipe4 = pipeline(tmp / "four", 4, 0)
        try:
            side = sizes[0]
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
            print(f"4 nodes: frames per node {shares}")
        finally:
            pipe4.close()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
