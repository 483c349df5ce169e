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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# stemstream_testing (test support) is not installed: import it from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from counting.geometry import FRAME_BYTES, N_SECTORS, ScanShape  # noqa: E402
from counting.simulator import SimulatedCamera, SimulatorConfig  # noqa: E402
from counting.sparse import read_counted_scan  # noqa: E402
from stemstream_testing.pipeline import ProcessPipeline  # noqa: E402
from streaming.camera.push import DEFAULT_HWM  # noqa: E402
from streaming.settings import StreamingSettings  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MB = 1 << 20


def run_scan(pipe: ProcessPipeline, scan: ScanShape, number: int, rate: float | None, hwm: int) -> dict:
    """One scan through the pipeline (real time when a rate is given): what was lost where, and memory."""
    before = pipe.wait_state(lambda s: s.nodes_ready == 2, 60)
    warm = pipe.memory.reset()
    t0 = time.time()
    camera = SimulatedCamera(SimulatorConfig(scan, dose=100.0, seed=number))  # shared by the four senders
    sent = pipe.send(camera, number, rate, realtime=rate is not None, send_timeout=120, hwm=hwm)
    camera_s = time.time() - t0
    record, h5 = pipe.record(number)
    after = pipe.wait_state(lambda s: s.time > record.written_time + 0.3, 30)
    counted = read_counted_scan(h5)
    expected = N_SECTORS * scan.positions
    missing = expected - int(np.unpackbits(counted.sector_masks[..., None], axis=-1).sum())
    lost = {
        "overflowed": sent.overflowed,
        "aggregator": (after.unroutable - before.unroutable)
        + (after.late - before.late)
        + (after.malformed - before.malformed),
        "node_late": int(counted.metadata.get("stemstream", {}).get("late_sectors", 0)),
        "in_transit": record.sectors_lost_in_transit,
    }
    taken = after.received - before.received
    return {
        "target_fps": rate,
        "camera_fps": scan.positions / camera_s,  # what the emulated camera achieved (it shares the CPUs)
        "taken_fps": taken / N_SECTORS / camera_s,  # frames/s the aggregator took while the camera ran
        "counted_fps": record.frames_written / max(record.written_time - record.first_data_time, 1e-9),
        "status": str(record.status),
        "completeness": record.completeness,
        "sectors_expected": expected,
        "sectors_missing": missing,
        "loss_pct": 100 * missing / expected,
        "lost": lost,
        "unaccounted": missing - sum(lost.values()),  # must be 0: a loss nothing counted
        "rss_before_mb": warm / MB,
        "rss_peak_mb": pipe.memory.peak / MB,
        "rss_growth_mb": (pipe.memory.peak - warm) / MB,
        "first_sector_to_file_s": record.written_time - t0,
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
    streaming = {
        "aggregator_receiver_hwm": a.receiver_hwm,
        "aggregator_node_hwm": a.node_hwm,
        "frame_timeout": a.frame_timeout,
        "scan_deadline": 1.0,
        "heartbeat": 0.2,
    }
    scan = ScanShape(a.side, a.side)
    out: dict = {
        "cpus": os.cpu_count(),
        "scan": [a.side, a.side],
        "raw_scan_mb": scan.positions * FRAME_BYTES / MB,
        # keys spelt as the environment variables of earlier results
        "settings": {f"STEMSTREAM_STREAMING__{k.upper()}": str(v) for k, v in streaming.items()}
        | {"sender_hwm": a.sender_hwm},
        "runs": {},
    }
    thresholds = {"background_threshold": 30.5, "xray_threshold": 600}
    with (
        tempfile.TemporaryDirectory(prefix="stemstream-overload-", dir="/tmp") as tmp,
        ProcessPipeline(Path(tmp), 2, streaming=streaming, counting=thresholds) as pipe,
    ):
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
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
