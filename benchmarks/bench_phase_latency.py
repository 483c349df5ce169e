"""How long after a scan's end the live page has its final phase fit: a simulated scan (256 x 256 by
default, 200 e/frame, known defocus and astigmatism) goes through two nodes' live publishers (half the
frames each, paced) to a real view (streaming.view.server) with its phase fits on during the scan; the
time from the view holding every node's final snapshot to the final phase record in its state is the
latency the issue's target (<= 1 s) is about. Each scan also reports the final fit's own time and the
machine's load.

Usage: python benchmarks/bench_phase_latency.py [--side 256] [--fps 2000] [--scans 3] [--json PATH]

The counted batches are simulated once (a minute at 256 x 256) and cached under --cache.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from counting.geometry import ScanShape  # noqa: E402
from counting.simulator import SimulatedCamera, SimulatorConfig  # noqa: E402
from stemstream_testing.support import free_port  # noqa: E402
from streaming.live.publisher import LivePublisher  # noqa: E402
from streaming.protocol import control as p  # noqa: E402
from streaming.settings import LiveSettings  # noqa: E402
from streaming.view.server import LiveServer  # noqa: E402

TRUTH = {"defocus": 0.05, "astigmatism": 0.02, "astigmatism_angle": 30.0, "rotation": 20.0}
LIVE = {"bf_center": (288.0, 288.0), "bf_radius": 180.0, "interval": 0.25, "phase_interval": 1.0}


def batches(side: int, cache: Path) -> list:
    """The scan's counted batches (256 frames each), from the cache when there."""
    path = cache / f"phase_latency_{side}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    config = SimulatorConfig(ScanShape(side, side), dose=200.0, seed=3, **TRUTH)
    out = list(SimulatedCamera(config).iter_counted(256))
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(out))
    return out


def one_scan(view: LiveServer, live: LiveSettings, scan: list, side: int, fps: float, n: int) -> dict:
    """Stream one scan through two publishers; the final record's latency after the view's last final."""
    nodes = [LivePublisher(zmq.Context.instance(), f"n{i}", live, view.ingest.address, None) for i in (0, 1)]
    key = f"latency-{n}"
    try:
        for i, node in enumerate(nodes):
            node.begin(p.ScanBegin(n, side, side, side * side, i, 2, scan_key=key))
        t0 = time.monotonic()
        for i, batch in enumerate(scan):
            nodes[i % 2].batch(key, *batch)
            wait = t0 + (i + 1) * len(batch[0]) / fps - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        for node in nodes:
            node.end(key)
        ended, final = None, None
        deadline = time.monotonic() + 60
        while final is None and time.monotonic() < deadline:
            state = view.state.scan(key)
            if state is not None and state.done and ended is None:
                ended = time.time()
            phase = (state.phase if state is not None else None) or {}
            if phase.get("final"):
                final = time.time()
            time.sleep(0.002)
        phase = view.state.scan(key).phase
        return {
            "scan_seconds": round(time.monotonic() - t0, 2),
            "latency_s": round(final - ended, 3) if final and ended else None,
            "final_fit_s": phase.get("seconds"),
            "fits": phase.get("fits"),
            "defocus": phase.get("defocus"),
            "defocus_err": phase.get("defocus_err"),
            "astigmatism": phase.get("astigmatism"),
            "load": os.getloadavg()[0],
        }
    finally:
        for node in nodes:
            node.close()


def main() -> None:
    """Run the scans, print a line each and the medians, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--fps", type=float, default=2000.0, help="frames/s the two publishers are fed at")
    ap.add_argument("--scans", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/stemstream-bench"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    scan = batches(a.side, a.cache)
    live = LiveSettings(**LIVE, bind=f"tcp://127.0.0.1:{free_port()}", page_port=0)
    view = LiveServer(live).start()
    rows = []
    try:
        for n in range(1, a.scans + 1):
            r = one_scan(view, live, scan, a.side, a.fps, n)
            rows.append(r)
            print(
                f"scan {n}: {a.side}x{a.side} in {r['scan_seconds']} s, {r['fits']} fits; final record "
                f"{r['latency_s']} s after the last final snapshot (the fit {r['final_fit_s']} s); defocus "
                f"{r['defocus']:.5f} ± {r['defocus_err']:.2g}; load {r['load']:.1f}",
                flush=True,
            )
    finally:
        view.stop()
    lat = sorted(r["latency_s"] for r in rows if r["latency_s"] is not None)
    if lat:
        print(f"median latency {lat[len(lat) // 2]:.3f} s over {len(lat)} scans")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"side": a.side, "fps": a.fps, "truth": TRUTH, "scans": rows}, indent=2))


if __name__ == "__main__":
    main()
