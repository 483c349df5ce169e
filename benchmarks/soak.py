"""Soak: a long session of back-to-back scans through real aggregator and node processes (the paper's
60-scan stability experiment, scaled down): zero loss per scan, and node memory sampled over the run.

Usage: python benchmarks/soak.py [--scans 60] [--side 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_streaming import RESULTS, Pipeline, _vm  # noqa: E402

from counting.geometry import ScanShape  # noqa: E402
from counting.simulator import SimulatorConfig  # noqa: E402


def main() -> None:
    """Run the soak and write JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--scans", type=int, default=60)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--json", type=Path, default=RESULTS / "soak.json")
    a = ap.parse_args()
    rows, rss = [], []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="stemstream-soak-", dir="/tmp") as tmp:
        pipe = Pipeline(Path(tmp), 2, 1)
        try:
            for k in range(a.scans):
                config = SimulatorConfig(ScanShape(a.side, a.side), dose=200.0, seed=k % 4)
                first, last = pipe.send(config, scan_number=k + 1)
                rec = pipe.record(k + 1)
                now = {f"node{i}": _vm(pid, "VmRSS") for i, pid in enumerate(pipe.node_pids)}
                rss.append(now)
                rows.append(
                    {
                        "scan": k + 1,
                        "status": rec["status"],
                        "frames": rec["frames_written"],
                        "completeness": rec["completeness"],
                        "lost": rec["sectors_lost_in_transit"],
                        "last_sector_to_file_s": rec["written_time"] - last,
                        "rss_kb": now,
                    }
                )
                print(
                    f"scan {k + 1:3d}: {rec['status']}, {rec['frames_written']} frames, "
                    f"{100 * rec['completeness']:.2f} %, file {rec['written_time'] - last:.2f} s after the "
                    f"last sector, RSS MB {[round(v / 1024) for v in now.values()]}",
                    flush=True,
                )
        finally:
            pipe.close()
    complete = sum(r["status"] == "complete" for r in rows)
    first10 = [sum(r.values()) for r in rss[: max(1, len(rss) // 6)]]
    last10 = [sum(r.values()) for r in rss[-max(1, len(rss) // 6) :]]
    summary = {
        "scans": a.scans,
        "side": a.side,
        "complete_scans": complete,
        "frames_lost": sum(a.side * a.side - r["frames"] for r in rows),
        "rss_first_sixth_mb": round(max(first10) / 1024),
        "rss_last_sixth_mb": round(max(last10) / 1024),
        "wall_s": round(time.time() - t0, 1),
        "rows": rows,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(summary, indent=2))
    print(
        f"{complete}/{a.scans} scans complete, {summary['frames_lost']} frames lost; node RSS (sum) "
        f"{summary['rss_first_sixth_mb']} MB early vs {summary['rss_last_sixth_mb']} MB late; "
        f"{summary['wall_s']} s; wrote {a.json}"
    )


if __name__ == "__main__":
    main()
