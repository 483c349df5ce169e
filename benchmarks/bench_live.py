"""The live view's cost and latency: counted frames/s with the live view off and on, and the time from a batch
counted to its image shown on the page.

Real processes: `stemstream aggregator` and two `stemstream node` (CLI, loopback TCP), four sender threads
here as the receivers, back-pressured (as fast as the pipeline takes them). "off": live.enabled false (no
publisher thread, no snapshots). "on": every node sends snapshots to `stemstream view` in its own process,
as a session runs it. "browser": the same with the page open in headless Chromium on this machine too (the
whole path: accumulate, snapshot, intake, PNG, WebSocket, browser; at the microscope the browser and the
view run on other machines than the nodes). A fresh pipeline per mode and round, the modes alternating over
``--rounds``; per pipeline a warm-up scan, then ``--scans`` scans whose counted frames/s (the stop record's:
first data to the file on disk) count; the ratio is of the medians. Latency is what the page measured for every image it showed
during the scans (newest and oldest batch new in each snapshot).

Usage: python benchmarks/bench_live.py [--side 128] [--scans 2] [--rounds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# stemstream_testing (test support) is not installed: import it from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from counting.geometry import ScanShape  # noqa: E402
from counting.simulator import SimulatedCamera, SimulatorConfig  # noqa: E402
from stemstream_testing.browser import headless_chromium  # noqa: E402
from stemstream_testing.pipeline import ProcessPipeline  # noqa: E402
from tasks.launch.plan import free_port  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLI = [sys.executable, "-m", "flows.cli"]


@contextlib.contextmanager
def view_process(work: Path, bind: str):
    """`stemstream view` in its own process, as a session runs it; yields its page URL."""
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "view.log", "w+")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [*CLI, "view", "--bind", bind, "--port", "0", "--scan-dir", str(work / "out")],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "live: " not in (text := (work / "view.log").read_text()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the view did not start: {text[-2000:]}")
            time.sleep(0.1)
        yield text.split("live: ")[1].split()[0]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def run_mode(work: Path, mode: str, side: int, scans: int) -> dict:
    """Scans through a fresh pipeline: live view off, on (a view process), or on with the page open in
    headless Chromium; counted frames/s, and the page's latencies."""
    live = {"enabled": mode != "off", "bind": f"tcp://127.0.0.1:{free_port()}"}
    rates, latencies = [], []
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(view_process(work, live["bind"])) if mode != "off" else None
        pipe = stack.enter_context(ProcessPipeline(work, 2, streaming={"live": live}))
        browser = stack.enter_context(headless_chromium(work / "browser")) if mode == "browser" else None
        if browser is not None:
            browser.open(url)
            browser.wait_for_text("connected")
        for n in range(scans + 1):  # scan 0 warms the pipeline up and is not counted, in every mode
            camera = SimulatedCamera(SimulatorConfig(ScanShape(side, side), seed=n))
            pipe.send(camera, n + 1)
            record, _ = pipe.record(n + 1)
            if n:
                rates.append(record.counted_frames_per_second)
            print(
                f"  {mode:7s} scan {n}: {record.counted_frames_per_second:.0f} counted frames/s", flush=True
            )
        if browser is not None:
            time.sleep(1.0)  # the last images reach the page
            latencies = [list(x) for x in browser.js("return window.liveLatencies")]
    return {"counted_fps": rates, "latencies": latencies}


def main() -> None:
    """Run both modes and print the ratio and the latency."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--scans", type=int, default=2, help="scans per pipeline, after a warm-up scan")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the three modes, alternating")
    ap.add_argument("--json", type=Path, default=RESULTS / "live.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        runs: dict[str, dict] = {m: {"counted_fps": [], "latencies": []} for m in ("off", "on", "browser")}
        for r in range(args.rounds):  # modes alternate, so the machine's other load touches all alike
            for mode, run in runs.items():
                got = run_mode(Path(tmp) / f"{mode}-{r}", mode, args.side, args.scans)
                for k in run:
                    run[k] += got[k]
    for run in runs.values():
        run["median_fps"] = statistics.median(run["counted_fps"])
    off, on, page = runs["off"], runs["on"], runs["browser"]
    newest = [x[0] for x in page["latencies"]]
    oldest = [x[1] for x in page["latencies"]]
    result = {
        "scan": f"{args.side}x{args.side}",
        "scans_per_mode": args.scans * args.rounds,
        "cpus": os.cpu_count(),
        "off": {k: v for k, v in off.items() if k != "latencies"},
        "on": {k: v for k, v in on.items() if k != "latencies"},
        "on_with_page": {k: v for k, v in page.items() if k != "latencies"},
        "throughput_ratio_on_off": on["median_fps"] / off["median_fps"],
        "throughput_ratio_page_off": page["median_fps"] / off["median_fps"],
        "latency_updates": len(newest),
        "latency_median_newest_s": statistics.median(newest) if newest else None,
        "latency_median_oldest_s": statistics.median(oldest) if oldest else None,
        "latency_p90_oldest_s": statistics.quantiles(oldest, n=10)[-1] if len(oldest) >= 10 else None,
    }
    print(
        f"counted frames/s, median of {args.scans * args.rounds}: off {off['median_fps']:.0f}, on {on['median_fps']:.0f}, "
        f"on with the page open here {page['median_fps']:.0f}"
    )
    print(f"throughput live on / off: {result['throughput_ratio_on_off']:.3f} (target >= 0.95)")
    print(f"throughput live on, page open on this machine / off: {result['throughput_ratio_page_off']:.3f}")
    if newest:
        print(
            f"update latency, median of {len(newest)} page updates: newest batch {result['latency_median_newest_s']:.3f} s, "
            f"oldest batch {result['latency_median_oldest_s']:.3f} s (target <= 1 s)"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
