"""Soak: the paper's 60-scan stability experiment, scaled down to 64x64 scans, as one real Prefect session
(local node streamers and aggregator, the simulated camera, verification of every scan) with the memory of
every session process sampled while it runs. The same as `stemstream soak`; writes JSON.

Usage: python benchmarks/soak.py [--scans 60] [--side 64] [--nodes 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    """Run the soak session and write JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--scans", type=int, default=60)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--json", type=Path, default=RESULTS / "soak.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stemstream-soak-", dir="/tmp") as tmp:
        # A private output directory and embedded Prefect server (set before Prefect is imported).
        os.environ["STEMSTREAM_OUTPUT_DIR"] = tmp
        os.environ.setdefault("PREFECT_HOME", str(Path(tmp) / ".prefect"))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        from flows.soak import run_soak

        report = run_soak(a.scans, a.side, a.side, nodes=a.nodes)
    data = report.as_dict()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(data, indent=2))
    for r in report.results:
        print(
            f"scan {r.scan_number:3d}: {r.record.status}, {'passed' if r.verified else 'FAILED'}, "
            f"{r.record.frames_written} frames, {100 * r.record.completeness:.2f} %, "
            f"file {r.record.seconds_to_file:.3f} s after the last data"
        )
    print(
        f"{report.complete_scans}/{a.scans} scans complete and verified; {report.frames_lost} frames and "
        f"{report.sectors_lost} sectors lost; RSS of all session processes {report.rss_early_mb:.0f} MB "
        f"(before the last third) vs {report.rss_late_mb:.0f} MB (last third), private {report.private_early_mb:.0f} vs "
        f"{report.private_late_mb:.0f} MB (trend {report.private_slope_mb_per_scan:+.2f} MB/scan); session {report.state} in {report.wall_s:.0f} s; wrote {a.json}"
    )
    if report.complete_scans != a.scans:
        sys.exit(1)


if __name__ == "__main__":
    main()
