"""The live view's cost and latency: counted frames/s with the live view (and its live phase) off and on,
measured side by side, and the time from a batch counted to its image shown on the page.

Real processes: `stemstream aggregator` and two `stemstream node` (CLI, loopback TCP), four sender threads
here as the receivers, back-pressured (as fast as the pipeline takes them), a simulated scan with a defocus
and astigmatism (so the view's phase fits find one). Modes (MODES): "off": live.enabled false (no publisher
thread, no snapshots). "on": every node adds its batches to the live images and the parallax bin sums and
sends snapshots to `stemstream view` in its own process, as a session runs it; the view fits the phase every
live.phase_interval. "phase-off": "on" without the live phase (live.parallax_bins 0): what the phase costs.
"page": "on" with the page open in headless Chromium on this machine too (at the microscope the browser and
the view run on other machines than the nodes).

Interleaved: ``--pairs`` rounds of the modes in turn (off, on, off, on, ...), a fresh pipeline per mode
and round, each a warm-up scan and then ``--scans`` scans whose counted frames/s (the stop record's: first
data to the file on disk) count. Other jobs load the machine and their load drifts: each round's ratio
(median of its scans over off's) compares runs a minute apart, and the figure is the median of the rounds'
ratios. The 1-minute load average before and after each run is recorded. Beside the rates, the CPU time
(user + system, from /proc) per counted frame of the pipeline's processes, the view's and this one's (the
senders): far less sensitive to other jobs than a rate, and on a CPU-bound machine off's CPU per frame over
a mode's is the throughput ratio that mode would get. Latency: what the page measured
for every image it showed (newest and oldest batch new in each snapshot), with --modes off,on,page.

Usage: python benchmarks/bench_live.py [--side 128] [--scans 2] [--pairs 3] [--modes off,on]
                                       [--json benchmarks/results/live.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# stemstream_testing (test support) is not installed: import it from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from counting.geometry import ScanShape  # noqa: E402
from counting.simulator import SimulatedCamera, SimulatorConfig  # noqa: E402
from stemstream_testing.browser import headless_chromium  # noqa: E402
from stemstream_testing.pipeline import ProcessPipeline  # noqa: E402
from tasks.launch.plan import free_port  # noqa: E402
from tasks.launch.processes import process_tree  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLI = [sys.executable, "-m", "flows.cli"]


@contextlib.contextmanager
def view_process(work: Path, bind: str, env: dict[str, str]):
    """`stemstream view` in its own process, as a session runs it (env: its live settings); yields its page
    URL."""
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "view.log", "w+")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [*CLI, "view", "--bind", bind, "--port", "0", "--scan-dir", str(work / "out")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "live: " not in (text := (work / "view.log").read_text()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the view did not start: {text[-2000:]}")
            time.sleep(0.1)
        yield text.split("live: ")[1].split()[0], proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


MODES = {  # what each mode sets in streaming.live (nodes and view alike)
    "off": {"enabled": False},
    "on": {"enabled": True},  # live images and live phase (parallax sums, the view's fits): the defaults
    "phase-off": {"enabled": True, "parallax_bins": 0},  # live images only: what the live phase costs
    "page": {"enabled": True},  # "on", with the page open in headless Chromium here
}


def cpu_seconds(pids: list[int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each process tree (pipeline, view) and by this process
    (the senders' threads, the simulator), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {"here": sum(os.times()[:2])}
    for name, pid in pids:
        total = 0
        for q in process_tree(pid):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{q}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        used[name] = used.get(name, 0.0) + total / tick
    return used


def fits_seen(url: str) -> list[int]:
    """Phase fits the view ran per scan (its /api/state): proof the live phase was on."""
    with urllib.request.urlopen(f"{url}api/state", timeout=10) as got:
        return [(s.get("phase") or {}).get("fits", 0) for s in json.load(got)["scans"]]


def run_mode(work: Path, mode: str, config: SimulatorConfig, scans: int) -> dict:
    """Scans through a fresh pipeline in one mode (MODES): counted frames/s per scan, the load average
    before and after, the view's phase fits and (page) the page's latencies."""
    live = {**MODES[mode], "bind": f"tcp://127.0.0.1:{free_port()}"}
    rates, latencies, fits, cpu = [], [], [], []
    load = [os.getloadavg()[0]]
    env = {f"STEMSTREAM_STREAMING__LIVE__{k.upper()}": str(v) for k, v in MODES[mode].items()}
    with contextlib.ExitStack() as stack:
        url, view_pid = (
            stack.enter_context(view_process(work, live["bind"], env)) if live["enabled"] else (None, 0)
        )
        pipe = stack.enter_context(ProcessPipeline(work, 2, streaming={"live": live}))
        pids = [(name, pr.pid) for name, pr in pipe.procs.items()] + (
            [("view", view_pid)] if view_pid else []
        )
        browser = stack.enter_context(headless_chromium(work / "browser")) if mode == "page" else None
        if browser is not None:
            browser.open(url)
            browser.wait_for_text("connected")
        for n in range(scans + 1):  # scan 0 warms the pipeline up and is not counted, in every mode
            camera = SimulatedCamera(dataclasses.replace(config, seed=n))
            before = cpu_seconds(pids)
            pipe.send(camera, n + 1)
            record, _ = pipe.record(n + 1)
            after = cpu_seconds(pids)
            if n:
                rates.append(record.counted_frames_per_second)
                ms = {k: 1000 * (after[k] - before.get(k, 0.0)) / record.frames_written for k in after}
                cpu.append({**ms, "total": sum(ms.values())})
            print(
                f"  {mode:9s} scan {n}: {record.counted_frames_per_second:.0f} counted frames/s", flush=True
            )
        if url is not None:
            time.sleep(1.5)  # the final fits and images reach the view and the page
            fits = fits_seen(url)
        if browser is not None:
            latencies = [list(x) for x in browser.js("return window.liveLatencies")]
    load.append(os.getloadavg()[0])
    return {"counted_fps": rates, "median_fps": statistics.median(rates), "load": load, "phase_fits": fits,
            "latencies": latencies, "cpu_ms_per_frame": cpu}  # fmt: skip


def interleaved(tmp: Path, modes: list[str], config: SimulatorConfig, scans: int, pairs: int) -> list[dict]:
    """``pairs`` rounds of the modes in turn (off, on, off, on, ...): the machine's other load, which
    drifts, touches every mode alike; per round each mode's median and its ratio to "off"."""
    rounds = []
    for r in range(pairs):
        got = {m: run_mode(tmp / f"{m}-{r}", m, config, scans) for m in modes}
        ratios = {m: got[m]["median_fps"] / got["off"]["median_fps"] for m in modes if m != "off"}
        print(f"round {r}: " + ", ".join(f"{m}/off {v:.3f}" for m, v in ratios.items()), flush=True)
        rounds.append({"modes": got, "ratios": ratios})
    return rounds


def summary(rounds: list[dict], modes: list[str], args: argparse.Namespace) -> dict:
    """The figures: per mode every scan's rate, per round the ratio to off, their median, the load."""
    per_mode = {}
    for m in modes:
        runs = [r["modes"][m] for r in rounds]
        rates = [x for run in runs for x in run["counted_fps"]]
        per_mode[m] = {
            "counted_fps": rates,
            "median_fps": statistics.median(rates),
            "round_medians": [run["median_fps"] for run in runs],
            "load_before_after": [run["load"] for run in runs],
            "phase_fits_per_scan": [run["phase_fits"] for run in runs],
            "cpu_ms_per_frame": [x for run in runs for x in run["cpu_ms_per_frame"]],
        }
        per_mode[m]["median_cpu_ms_per_frame"] = statistics.median(
            x["total"] for x in per_mode[m]["cpu_ms_per_frame"]
        )
    ratios = {m: [r["ratios"][m] for r in rounds] for m in modes if m != "off"}
    loads = [x for r in rounds for m in modes for x in r["modes"][m]["load"]]
    latencies = [x for r in rounds if "page" in r["modes"] for x in r["modes"]["page"]["latencies"]]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "scan": f"{args.side}x{args.side}",
        "simulated": {"dose": args.dose, "defocus": args.defocus, "astigmatism": args.astigmatism},
        "scans_per_run": args.scans,
        "pairs": args.pairs,
        "order": "interleaved: " + ", ".join(modes) + f" (x{args.pairs})",
        "cpus": os.cpu_count(),
        "load_average_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "modes": per_mode,
        "ratios_per_round": ratios,
        "median_ratio": {m: statistics.median(v) for m, v in ratios.items()},
        "cpu_ratio_off_over_mode": {  # the throughput ratio a CPU-bound machine would give
            m: per_mode["off"]["median_cpu_ms_per_frame"] / per_mode[m]["median_cpu_ms_per_frame"]
            for m in modes
            if m != "off"
        },
    }
    if latencies:
        newest, oldest = [x[0] for x in latencies], [x[1] for x in latencies]
        result["latency"] = {
            "updates": len(newest),
            "median_newest_s": statistics.median(newest),
            "median_oldest_s": statistics.median(oldest),
            "p90_oldest_s": statistics.quantiles(oldest, n=10)[-1] if len(oldest) >= 10 else None,
        }
    return result


def main() -> None:
    """Run the modes interleaved and print the ratios to "off" (target: on/off >= 0.95)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--scans", type=int, default=2, help="counted scans per run, after a warm-up scan")
    ap.add_argument("--pairs", type=int, default=3, help="rounds of the modes, interleaved (>= 3)")
    ap.add_argument("--modes", default="off,on", help=f"comma-separated, off first; of {', '.join(MODES)}")
    ap.add_argument("--dose", type=float, default=200.0, help="electrons per frame")
    ap.add_argument("--defocus", type=float, default=0.05, help="simulated (the fits then find one)")
    ap.add_argument("--astigmatism", type=float, default=0.02)
    ap.add_argument("--json", type=Path, default=RESULTS / "live.json")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "off" or len(modes) < 2 or not set(modes) <= set(MODES):
        ap.error(f"--modes: off first, then one or more of {', '.join(m for m in MODES if m != 'off')}")
    config = SimulatorConfig(
        ScanShape(args.side, args.side), dose=args.dose, defocus=args.defocus, astigmatism=args.astigmatism,
        astigmatism_angle=30.0, rotation=20.0,
    )  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench-live-"))
    try:
        rounds = interleaved(tmp, modes, config, args.scans, args.pairs)
    except BaseException:
        print(f"failed: the processes' logs are kept in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp)  # only the run's own temporary directory
    result = summary(rounds, modes, args)
    loads = result["load_average_1min"]
    print(
        f"{result['date']}, load average (1 min) {loads['min']:.1f}..{loads['max']:.1f} on {result['cpus']} CPUs"
    )
    for m in modes:
        got = result["modes"][m]
        parts = {
            k: statistics.median(x[k] for x in got["cpu_ms_per_frame"]) for k in got["cpu_ms_per_frame"][0]
        }
        print(f"  {m:9s} counted frames/s, median of {len(got['counted_fps'])}: {got['median_fps']:.0f}; "
              f"CPU ms per frame {got['median_cpu_ms_per_frame']:.2f} ("
              + ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if k != "total") + ")")  # fmt: skip
    for m, v in result["median_ratio"].items():
        each = ", ".join(f"{x:.3f}" for x in result["ratios_per_round"][m])
        target = " (target >= 0.95)" if m == "on" else ""
        print(f"  {m}/off: median of {args.pairs} rounds {v:.3f}{target}; per round {each}; "
              f"CPU per frame off/{m} {result['cpu_ratio_off_over_mode'][m]:.3f}")  # fmt: skip
    if "latency" in result:
        lat = result["latency"]
        print(f"  update latency, median of {lat['updates']}: newest {lat['median_newest_s']:.3f} s, "
              f"oldest {lat['median_oldest_s']:.3f} s (target <= 1 s)")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
