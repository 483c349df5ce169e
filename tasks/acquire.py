"""Acquiring a scan: trigger the (simulated) camera, follow it, and wait for its counted file."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from counting.errors import TransientError
from counting.geometry import ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from streaming.scan_record import ScanRecord
from streaming.scan_sender import send_simulated_scan
from tasks.scan_result import CameraCounts


class ScanTimeout(TransientError, TimeoutError):
    """A scan's file did not appear in time."""


def trigger_simulated_scan(
    receivers: list[str],
    scan_number: int,
    width: int,
    height: int,
    dose: float,
    seed: int,
    rate: float | None = None,
    timeout: float = 600.0,
) -> CameraCounts:
    """Play a simulated scan into the aggregator, as the four receiving servers would; returns counts.

    rate None: the camera waits for the pipeline (a file replay; nothing is lost). A rate in frames/s: the
    camera runs in real time, as the instrument does, and the receivers drop (and count) every sector the
    aggregator cannot take at once.
    """
    camera = SimulatedCamera(SimulatorConfig(ScanShape(width, height), dose=dose, seed=seed))
    results = send_simulated_scan(
        camera, receivers, rate, scan_number=scan_number, realtime=rate is not None, send_timeout=timeout
    )
    return CameraCounts(
        sectors_sent=sum(r.sent for r in results),
        sectors_dropped=sum(r.dropped for r in results),
        sectors_overflowed=sum(r.overflowed for r in results),
    )


def wait_for_scan(
    output_dir: Path, scan_number: int, timeout: float, check: Callable[[], None] | None = None
) -> ScanRecord:
    """The stop record of a scan once the writer has written it (its HDF5 is then on disk)."""
    deadline = time.monotonic() + timeout
    pattern = f"*_{scan_number:05d}.json"
    while time.monotonic() < deadline:
        found = sorted(output_dir.glob(pattern)) if output_dir.exists() else []
        if found:
            return ScanRecord.load(found[-1])
        if check is not None:
            check()
        time.sleep(0.05)
    raise ScanTimeout(f"scan {scan_number}: no counted file in {output_dir} after {timeout:.0f} s")
