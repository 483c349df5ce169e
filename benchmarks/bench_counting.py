"""Electron-counting speed, side by side in one run on the same frames: our kernel, plain numpy, stempy.

Part 1 (in-memory frames, same fixed thresholds, same integer dark, outputs checked identical):
  frames/s per core of the numba kernel (1 thread), the numpy reference and stempy's electron_count_frame.
Part 2 (raw v5 files from the page cache, thresholds estimated by each tool with production settings):
  `stemstream count`'s code path (counting.offline) against stempy's multi-pass raw-file counting,
  both with 1 thread (per core) and with all cores.

Usage: python benchmarks/bench_counting.py [--frames 1024] [--raw-scan 32] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from counting.dark import dark_reference
from counting.geometry import ScanShape
from counting.kernel import Counter, Thresholds, default_workers
from counting.offline import count_raw_scan
from counting.raw import open_raw_scan, write_raw_scan
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.thresholds import estimate_thresholds

# stemstream_testing (test support) is not installed: import it from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stemstream_testing.options import estimation, options
from stemstream_testing.reference import count_reference  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of fn over repeats (after one warm-up call), and its last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def simulated_frames(n: int, dose: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n production-like frames (materialised, so every implementation reads the same memory) and a dark."""
    side = int(np.ceil(np.sqrt(n)))
    cam = SimulatedCamera(SimulatorConfig(ScanShape(side, side), dose=dose, seed=seed))
    frames = np.concatenate([b.frames for b in cam.iter_batches(64)])[:n].copy()
    return frames, dark_reference(cam.dark_frames(100))


def bench_kernel(frames: np.ndarray, dark: np.ndarray, repeats: int) -> dict:
    """Part 1: in-memory frames, one core each, identical outputs."""
    import stempy.image as stim

    # stempy truncates the dark to integers: give everyone the same integer dark so outputs must agree.
    idark = np.floor(dark).astype(np.float32)
    est = estimate_thresholds(frames[:20], idark, estimation())
    t = Thresholds(est.background_threshold, est.x_ray_threshold)
    counter = Counter(idark, t)
    n = len(frames)

    ours_s, ours = timed(lambda: counter.count(frames, workers=1), repeats)
    ours_all_s, _ = timed(lambda: counter.count(frames, workers=default_workers()), repeats)
    n_np = min(n, 64)
    numpy_s, ref = timed(lambda: count_reference(frames[:n_np], idark, t), max(1, repeats - 1))
    n_st = min(n, 256)

    def stempy_loop() -> list[np.ndarray]:
        return [
            np.asarray(
                stim.electron_count_frame(
                    frames[i], darkreference=idark, background_threshold=t.background, xray_threshold=t.xray
                ).data[0, 0]
            )
            for i in range(n_st)
        ]

    stempy_s, st = timed(stempy_loop, max(1, repeats - 1))
    identical = all(np.array_equal(ours[i], st[i]) for i in range(n_st)) and all(
        np.array_equal(ours[i], ref[i]) for i in range(n_np)
    )
    res = {
        "frames": n,
        "events_per_frame": float(ours.counts.mean()),
        "thresholds_adu": [t.background, t.xray],
        "ours_fps_per_core": n / ours_s,
        "ours_fps_all_cores": n / ours_all_s,
        "numpy_fps_per_core": n_np / numpy_s,
        "stempy_fps_per_core": n_st / stempy_s,
        "outputs_identical": bool(identical),
    }
    res["ours_vs_stempy_per_core"] = res["ours_fps_per_core"] / res["stempy_fps_per_core"]
    res["ours_vs_numpy_per_core"] = res["ours_fps_per_core"] / res["numpy_fps_per_core"]
    return res


def bench_raw(scan_side: int, dose: float, repeats: int, workdir: Path) -> dict:
    """Part 2: the same raw v5 files counted by stemstream's offline path and by stempy's multi-pass reader."""
    import stempy.image as stim
    import stempy.io as stio

    cam = SimulatedCamera(SimulatorConfig(ScanShape(scan_side, scan_side), dose=dose, seed=11))
    paths = write_raw_scan(workdir, 1, cam.scan, cam.iter_batches(64))
    files = [str(p) for p in paths]
    n = cam.total_frames
    zeros = np.zeros((576, 576), np.float32)  # production passes a zero dark to stempy; do the same for both

    def ours(workers: int):
        opts = options(workers=workers)
        return lambda: count_raw_scan(open_raw_scan(paths), zeros, opts, batch_size=64)

    def theirs(threads: int):
        def go():
            r = stio.reader(files, version=stio.FileVersion.VERSION5, backend="multi-pass", threads=threads)
            return stim.electron_count(
                r,
                zeros,
                number_of_samples=1200,
                threshold_num_blocks=20,
                background_threshold_n_sigma=4.5,
                xray_threshold_n_sigma=175,
            )

        return go

    cores = default_workers()
    ours1, counted = timed(ours(1), repeats)
    oursn, _ = timed(ours(cores), repeats)
    st1, sa = timed(theirs(1), max(1, repeats - 1))
    stn, _ = timed(theirs(cores), max(1, repeats - 1))
    ours_events = counted.num_events
    stempy_events = int(sum(len(e) for e in sa.data.ravel()))
    res = {
        "frames": n,
        "raw_bytes": int(sum(p.stat().st_size for p in paths)),
        "ours_fps_1_thread": n / ours1,
        "ours_fps_all_cores": n / oursn,
        "stempy_fps_1_thread": n / st1,
        "stempy_fps_all_cores": n / stn,
        "cores": cores,
        "ours_events": ours_events,
        "stempy_events": stempy_events,
        "ours_thresholds": [
            counted.metadata["electron_counting"]["background_threshold"],
            counted.metadata["electron_counting"]["x_ray_threshold"],
        ],
        "stempy_thresholds": [
            float(sa.metadata["electron_counting"]["background_threshold"]),
            float(sa.metadata["electron_counting"]["x_ray_threshold"]),
        ],
    }
    res["ours_vs_stempy_per_core"] = res["ours_fps_1_thread"] / res["stempy_fps_1_thread"]
    res["ours_vs_stempy_all_cores"] = res["ours_fps_all_cores"] / res["stempy_fps_all_cores"]
    return res


def main() -> None:
    """Run both parts and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1024)
    ap.add_argument("--dose", type=float, default=200.0)
    ap.add_argument("--raw-scan", type=int, default=32, help="raw-file scan is N x N")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=RESULTS / "counting.json")
    a = ap.parse_args()

    frames, dark = simulated_frames(a.frames, a.dose, seed=5)
    kernel = bench_kernel(frames, dark, a.repeats)
    del frames
    with tempfile.TemporaryDirectory(prefix="stemstream-bench-") as tmp:
        raw = bench_raw(a.raw_scan, a.dose, a.repeats, Path(tmp))

    out = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load1": os.getloadavg()[0]},
        "dose": a.dose,
        "kernel": kernel,
        "raw_files": raw,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2))
    k, r = kernel, raw
    print(
        f"in-memory, {k['frames']} frames, {k['events_per_frame']:.0f} events/frame, identical={k['outputs_identical']}"
    )
    print(f"  ours (numba, 1 core)   {k['ours_fps_per_core']:9.0f} frames/s")
    print(f"  ours (all cores)       {k['ours_fps_all_cores']:9.0f} frames/s")
    print(
        f"  numpy reference        {k['numpy_fps_per_core']:9.0f} frames/s   ours/numpy  {k['ours_vs_numpy_per_core']:.1f}x"
    )
    print(
        f"  stempy frame loop      {k['stempy_fps_per_core']:9.0f} frames/s   ours/stempy {k['ours_vs_stempy_per_core']:.1f}x"
    )
    print(f"raw v5 files, {r['frames']} frames, thresholds estimated (1200 samples / 20 frames)")
    print(
        f"  ours 1 thread          {r['ours_fps_1_thread']:9.0f} frames/s   stempy 1 thread {r['stempy_fps_1_thread']:7.0f}   ratio {r['ours_vs_stempy_per_core']:.1f}x"
    )
    print(
        f"  ours {r['cores']} threads         {r['ours_fps_all_cores']:9.0f} frames/s   stempy {r['cores']} threads {r['stempy_fps_all_cores']:7.0f}   ratio {r['ours_vs_stempy_all_cores']:.1f}x"
    )
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
