"""Real scans on disk for the catalogue tests: a simulated scan counted and written as the writer writes
it (sparse HDF5) with its stop record beside it, a uuid, a scan id and a start time of the test's choice."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from counting.geometry import ScanShape
from counting.pipeline import count_batches
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import write_counted_scan
from stemstream_testing.options import options
from streaming.protocol.record import ScanRecord, ScanStatus, record_path


def write_scan(
    directory: Path,
    scan_number: int,
    scan_id: int,
    width: int = 8,
    height: int = 8,
    *,
    started: float | None = None,
    dose: float = 20.0,
    seed: int = 1,
) -> ScanRecord:
    """Count a simulated scan into ``FOURD_<date>_<id>_<scan>.h5`` and save its stop record; the record."""
    directory.mkdir(parents=True, exist_ok=True)
    camera = SimulatedCamera(SimulatorConfig(ScanShape(width, height), dose=dose, seed=seed, pool_size=16))
    counted = count_batches(camera.iter_batches(64), camera.scan, camera.dark(), options())
    started = time.time() if started is None else started
    path = (
        directory
        / f"FOURD_{time.strftime('%y%m%d_%H%M', time.gmtime(started))}_{scan_id:05d}_{scan_number:05d}.h5"
    )
    write_counted_scan(path, counted)
    record = ScanRecord(
        scan_number=scan_number,
        status=ScanStatus.COMPLETE,
        path=str(path),
        scan_width=width,
        scan_height=height,
        expected_frames=width * height,
        frames_written=counted.num_frames,
        complete_frames=counted.complete_frames,
        completeness=counted.completeness,
        events=counted.num_events,
        nodes=1,
        nodes_done=1,
        reasons=["end"],
        sectors_lost_in_transit=0,
        thresholds=[float(counted.metadata["electron_counting"]["background_threshold"]), 1000.0],
        sha256=None,
        first_data_time=started,
        last_data_time=started + 1.0,
        written_time=started + 1.5,
        scan_id=scan_id,
        scan_uuid=uuid.uuid4().hex,
    )
    record.save(record_path(path))
    return record
