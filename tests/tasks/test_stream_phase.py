"""The session's stream-phase step on real files: the whole-scan phase fit goes into the scan's HDF5
(/phase) and its stop record by the staged, checked-copy replacement (the events untouched, the file still
verifies, nothing ever replaced), calibrated from the microscope's metadata in the file; a file changed
since it was written is never touched; the catalogue gets an analysis of kind stream-phase, and `stemstream
scans show` prints its defocus, astigmatism and rotation."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from catalogue import Catalogue, ScanEntry
from catalogue.recorder import Recorder
from counting.microscope_meta import MicroscopeMetadata
from counting.phase.record import read_phase
from counting.sparse import CountedScan, write_counted_scan
from counting.storage.durable import file_sha256
from stemstream_testing.cli import in_process
from streaming.protocol.record import ScanRecord, ScanStatus, record_path
from streaming.protocol.staged import pending_record_path
from tasks.microscope import MicroscopeLink, attach_with_record
from tasks.stream_phase import KIND, add_stream_phase, record_stream_phase
from tasks.verify import verify_scan
from tests.counting.phase.test_record import counted_scan

SIDE = 32


@pytest.fixture(scope="module")
def simulated() -> CountedScan:
    return counted_scan(SIDE, SIDE, defocus=0.05)


def write(directory: Path, scan: CountedScan, sha256: bool = True) -> Path:
    """The scan written as the writer writes it, with its stop record (the file's checksum in it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = write_counted_scan(directory / "FOURD_261207_0612_00003_00001.h5", scan)
    now = time.time()
    ScanRecord(
        scan_number=1, status=ScanStatus.COMPLETE, path=str(path), scan_width=SIDE, scan_height=SIDE,
        expected_frames=SIDE * SIDE, frames_written=scan.num_frames, complete_frames=scan.complete_frames,
        completeness=scan.completeness, events=scan.num_events, nodes=1, nodes_done=1, reasons=["end"],
        sectors_lost_in_transit=0, thresholds=[10.0, 1000.0], sha256=file_sha256(path) if sha256 else None,
        first_data_time=now, last_data_time=now, written_time=now, scan_id=3, scan_uuid=uuid.uuid4().hex,
    ).save(record_path(path))  # fmt: skip
    return path


def events_of(path: Path) -> tuple:
    with h5py.File(path) as f:
        e = f["electron_events"]
        return [a.tobytes() for a in e["frames"][()]], e["sector_masks"][()], dict(e["scan_positions"].attrs)


def attach_calibration(path: Path) -> None:
    """The microscope's metadata (0.4 Å step, 22 mrad) added by the metadata step's own code."""
    meta = MicroscopeMetadata("scan1.json", "json", "0" * 64, 0.0, 1, (0.4, 0.4), 22.0, "test")
    link = MicroscopeLink("attached", "scan1.json", None, meta.summary())
    assert attach_with_record(path, meta, ScanRecord.load(record_path(path)), link)


def test_the_step_adds_the_fit_without_touching_the_events(tmp_path: Path, simulated: CountedScan) -> None:
    path = write(tmp_path, simulated)
    attach_calibration(path)
    before = events_of(path)
    out = add_stream_phase(path)
    assert out.added and out.reason is None, out
    assert out.summary["status"] == "ok" and out.summary["units"] == "nm" and out.summary["calibrated"]
    rec = read_phase(path)
    nm_per_px = 0.04 * 1000.0 / rec.fit.mrad_per_px  # step 0.4 Å; mrad per px = 22 / the BF radius
    assert abs(rec.fit.defocus / (0.05 * nm_per_px) - 1) < 0.05
    after = events_of(path)
    assert after[0] == before[0] and np.array_equal(after[1], before[1]) and after[2] == before[2]
    record = ScanRecord.load(record_path(path))
    assert out.sha256 == record.sha256 == file_sha256(path)  # file and record in step
    assert record.extra["phase"] == out.summary and record.extra["microscope"]["status"] == "attached"
    assert verify_scan(path, SIDE, SIDE, 0.99).ok
    assert not pending_record_path(path).exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        path.name, record_path(path).name,
    ]  # fmt: skip
    again = add_stream_phase(path)  # never replaced
    assert not again.added and "already has /phase: nothing is replaced" in again.reason
    assert file_sha256(path) == out.sha256 and ScanRecord.load(record_path(path)).sha256 == out.sha256
    assert not pending_record_path(path).exists()


def test_a_file_changed_since_written_is_never_touched(tmp_path: Path, simulated: CountedScan) -> None:
    path = write(tmp_path, simulated)
    record = ScanRecord.load(record_path(path))
    record.sha256 = "f" * 64  # the file is not what the writer recorded
    record.save(record_path(path))
    content = path.read_bytes()
    out = add_stream_phase(path)
    assert not out.added and "changed since it was written" in out.reason and out.sha256 is None
    assert path.read_bytes() == content and ScanRecord.load(record_path(path)).sha256 == "f" * 64
    assert not pending_record_path(path).exists() and len(list(tmp_path.iterdir())) == 2


def test_scans_show_lists_the_phase_fit(tmp_path: Path, simulated: CountedScan) -> None:
    out_dir = tmp_path / "out"
    path = write(tmp_path / "scans", simulated, sha256=False)  # uncalibrated: no microscope metadata
    outcome = add_stream_phase(path)
    url = f"sqlite:///{out_dir / 'catalogue.sqlite'}"
    out_dir.mkdir()
    recorder = Recorder(lambda: Catalogue.open(url), out_dir / "pending.jsonl")
    recorder.scan(ScanEntry.from_stop_record(record_path(path), verified=True))
    record_stream_phase(recorder, outcome)
    assert recorder.close(30).pending == 0
    with Catalogue.open(url) as cat:
        (analysis,) = cat.find_scan(path.name).analyses
    assert analysis.kind == KIND == "stream-phase" and analysis.error is None and analysis.calibrated is False
    assert analysis.results["phase"]["defocus"] == outcome.summary["defocus"]
    config = tmp_path / "stemstream.toml"
    config.write_text("# empty\n")
    env = {"STEMSTREAM_CONFIG": str(config), "STEMSTREAM_OUTPUT_DIR": str(out_dir), "COLUMNS": "250"}
    shown = in_process(["scans", "show", path.name], env)
    assert shown.returncode == 0, shown.stderr + shown.stdout
    s = outcome.summary
    lines = {line.strip(" │|").split()[0]: line for line in shown.stdout.splitlines() if line.strip(" │|")}
    assert (
        f"{s['defocus']:.4g} ± {s['defocus_err']:.2g} scan px per detector px, uncalibrated"
        in lines["defocus"]
    )
    assert f"{s['astigmatism']:.4g} ± " in lines["astigmatism"] and "°" in lines["astigmatism"]
    assert f"{s['rotation']:.3g} ± " in lines["rotation"]
    assert "stream-phase" in shown.stdout and "calibration" in shown.stdout and "uncalibrated" in shown.stdout
