"""Frame production speed of the simulated 4D Camera on one core, against the counting-rate target.

The simulator has to outpace whatever consumes it: the target is >= 5x the counting kernel's 10,000 frames/s per
core, i.e. >= 50,000 frames/s per core from iter_batches and iter_sectors. Measured: construction (noise pool),
iter_batches (zero-copy, consumer drops each batch), iter_batches_with_truth, iter_sectors (all four modules),
and the fallback when the consumer keeps the last 8 batches (frames then render into fresh arrays).

Usage: python benchmarks/bench_simulator.py [--scan 128] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np

from counting.geometry import ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig

RESULTS = Path(__file__).parent / "results"
COUNTING_TARGET = 10_000.0  # frames/s per core the counting kernel is expected to reach
SIMULATOR_TARGET = 5 * COUNTING_TARGET


def rate(run: Callable[[], int], repeats: int) -> dict:
    """Median and best frames/s of run() (which returns the frames it produced) after one warm-up."""
    run()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t0))
    return {
        "median": round(statistics.median(rates)),
        "best": round(max(rates)),
        "runs": [round(r) for r in rates],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scan", type=int, default=128, help="scan side in positions (frames = side**2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS / "simulator.json")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target is per core

    config = SimulatorConfig(scan=ScanShape(args.scan, args.scan))
    t0 = time.perf_counter()
    cam = SimulatedCamera(config)
    construct_s = time.perf_counter() - t0
    frames_total = cam.total_frames

    def batches() -> int:
        n = 0
        for b in cam.iter_batches(64):
            n += len(b)
        return n

    def with_truth() -> int:
        n = 0
        for b, _truth in cam.iter_batches_with_truth(64):
            n += len(b)
        return n

    def sectors() -> int:
        n = 0
        for _fn, _pos, _module, _sector in cam.iter_sectors():
            n += 1
        return n // 4

    def keeping() -> int:
        kept: collections.deque = collections.deque(maxlen=8)
        n = 0
        for b in cam.iter_batches(64):
            kept.append(b)
            n += len(b)
        return n

    first = cam.frame_numbers[0]
    truth = [len(cam.ground_truth(fn)) for fn in range(first, first + 256)]
    dark = cam.dark()
    central = []
    for fn in range(first, first + 16):
        t = cam.ground_truth(fn).astype(np.int64)
        central.append(cam.frame(fn).ravel()[t] - dark.ravel()[t])
    central = np.concatenate(central)

    results = {
        "iter_batches": rate(batches, args.repeats),
        "iter_batches_with_truth": rate(with_truth, args.repeats),
        "iter_sectors": rate(sectors, args.repeats),
        "iter_batches_keeping_8_batches": rate(keeping, args.repeats),
    }
    report = {
        "benchmark": "simulator",
        "frames_per_run": frames_total,
        "scan": [args.scan, args.scan],
        "config": {k: v for k, v in vars(config).items() if k != "scan"},
        "construct_seconds": round(construct_s, 3),
        "counting_target_frames_per_s": COUNTING_TARGET,
        "simulator_target_frames_per_s": SIMULATOR_TARGET,
        "frames_per_s_one_core": results,
        "meets_target": {k: v["median"] >= SIMULATOR_TARGET for k, v in results.items()},
        "typical_frame": {
            "electrons_per_frame": round(float(np.mean(truth)), 2),
            "electron_central_pixel_adu_mean": round(float(central.mean()), 2),
            "electron_central_pixel_adu_median": round(float(np.median(central)), 2),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "numba": numba.__version__,
        },
    }
    for name, r in results.items():
        flag = "ok" if r["median"] >= SIMULATOR_TARGET else "below target"
        print(f"{name:32s} {r['median']:>9,d} frames/s (best {r['best']:,d})  [{flag}]")
    print(f"construction {construct_s:.2f} s; counting target {COUNTING_TARGET:,.0f}, simulator target "
          f"{SIMULATOR_TARGET:,.0f} frames/s per core")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
