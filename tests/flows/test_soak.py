"""The soak (flows/soak.py) under the Prefect test harness: a real local session of back-to-back scans.

The full 60-scan 64x64 run is `stemstream soak` (benchmarks/soak.py records it); this is its short form,
which must also lose nothing and keep memory flat.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.soak import run_soak

# serial: memory peaks of a session are only comparable with nothing else running beside it
pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.serial, pytest.mark.product_defaults]


@pytest.mark.timeout(300)
def test_soak_session_loses_nothing_and_memory_stays_flat(
    stemstream_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small queues: the default ones (hold queue up to 170 MB per node, aggregator queues up to 500 MB) fill
    # to different levels in each scan, and in a short run their high-water marks can set a new peak late.
    for name, value in (
        ("NODE_HOLD_LIMIT", 64),
        ("AGGREGATOR_RECEIVER_HWM", 64),
        ("AGGREGATOR_NODE_HWM", 64),
    ):
        monkeypatch.setenv(f"STEMSTREAM_STREAMING__{name}", str(value))
    report = run_soak(n_scans=12, width=32, height=32, nodes=2, every=0.1)
    assert report.state == "Completed", report.message
    assert [r.scan_number for r in report.results] == list(range(1, 13))
    assert report.complete_scans == 12 and report.frames_lost == 0 and report.sectors_lost == 0
    assert all(r.record.completeness == 1.0 for r in report.results)
    # Memory was really sampled, in most scans, from every process of the session (two nodes with a
    # counting worker each and the aggregator: hundreds of MB).
    assert len(report.rss_mb) >= 8 and report.rss_early_mb > 300 and report.private_early_mb > 100
    # Flat: no new peak of private memory in the last third beyond the scan-to-scan noise (+-20 MB here).
    # 40 MB is less than a leak of one batch of raw frames (32 x 663 kB) per scan would add over 3 scans.
    assert report.private_late_mb <= report.private_early_mb + 40, report.private_mb
    assert report.rss_late_mb <= report.rss_early_mb * 1.05, report.rss_mb
