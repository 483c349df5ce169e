"""The microscope's metadata: a real DM4 (written from the published format, read back by ncempy) found by
scan number and time, its tags under /metadata/microscope and its HAADF under /stem/images of the scan's
HDF5, the link or the reason it is missing in the stop record, and the file never put at risk."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from counting.geometry import ScanShape
from counting.kernel import Thresholds
from counting.microscope_meta import MicroscopeMetadataError, attach_microscope, read_microscope
from counting.pipeline import CountingOptions, count_batches
from counting.settings import CountingSettings
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import read_counted_scan, write_counted_scan
from counting.storage.durable import file_sha256
from stemstream_testing.dm4 import write_dm4
from streaming.components import threshold_config
from streaming.protocol.record import ScanRecord, ScanStatus, record_path
from tasks.microscope import link_microscope_metadata, read_microscope_file
from tasks.settings import MicroscopeSettings
from tasks.verify import verify_scan

STEP_NM = 0.0362  # 0.362 Å
ALPHA = 24.5  # mrad


def scan_file(directory: Path, scan_number: int = 17, shape: ScanShape = ScanShape(9, 8)) -> Path:
    """A counted simulated scan and its stop record, as the scan writer leaves them."""
    cam = SimulatedCamera(SimulatorConfig(shape, dose=30, seed=scan_number))
    options = CountingOptions(Thresholds(40.0, 2000.0), threshold_config(CountingSettings()), 1)
    counted = count_batches(cam.iter_batches(32), cam.scan, cam.dark(), options)
    path = write_counted_scan(directory / f"FOURD_261206_0700_00001_{scan_number:05d}.h5", counted)
    now = time.time()
    record = ScanRecord(
        scan_number, ScanStatus.COMPLETE, str(path), shape.width, shape.height, shape.positions,
        shape.positions, shape.positions, 1.0, counted.num_events, 1, 1, [], 0, [40.0, 2000.0],
        sha256=file_sha256(path), first_data_time=now - 2, last_data_time=now - 1, written_time=now,
    )  # fmt: skip
    record.save(record_path(path))
    return path


def haadf(shape: ScanShape) -> np.ndarray:
    """The microscope's HAADF of the scan: the sample columns (the 4D Camera's flyback column is not in it)."""
    y, x = np.mgrid[: shape.height, : shape.width - 1]
    return (100.0 + 10 * x + y).astype(np.float32)


def dm4_for(directory: Path, scan_number: int, shape: ScanShape = ScanShape(9, 8), **tags: object) -> Path:
    meta = {
        "Microscope Info": {"Voltage": 300000.0, "Microscope": "TEAM 0.5", "Operation Mode": "SCANNING"},
        "4Dcamera Parameters": {
            "scan_number": scan_number,
            "nflyback": 1.0,
            "convergence_semiangle_mrad": ALPHA,
        },
        "DigiScan": {"Sample Time": 11.0},
    }
    for key, value in tags.items():
        meta[key] = value
    directory.mkdir(parents=True, exist_ok=True)
    return write_dm4(directory / f"scan{scan_number}.dm4", haadf(shape), STEP_NM, "nm", meta)


def settings(directory: Path, **kw: object) -> MicroscopeSettings:
    return MicroscopeSettings(dir=directory, wait=0.0, **kw)


def test_written_dm4_reads_back_with_ncempy(tmp_path: Path) -> None:
    from ncempy.io import dm

    path = dm4_for(tmp_path, 17)
    image = dm.dmReader(path)
    assert np.array_equal(image["data"], haadf(ScanShape(9, 8)))
    assert image["pixelUnit"] == ["nm", "nm"]
    assert image["pixelSize"] == pytest.approx([STEP_NM, STEP_NM])
    with dm.fileDM(path) as f:
        md = f.getMetadata(0)
    assert md["Microscope Info Voltage"] == 300000.0
    assert md["4Dcamera Parameters scan_number"] == 17
    meta = read_microscope_file(path, settings(tmp_path))
    assert meta.step_angstrom == pytest.approx((10 * STEP_NM, 10 * STEP_NM))
    assert meta.convergence_semiangle_mrad == pytest.approx(ALPHA)
    assert meta.convergence_source == "4Dcamera Parameters.convergence_semiangle_mrad"
    assert meta.energy_ev == 300000.0 and meta.scan_number == 17


def test_dm4_metadata_and_haadf_go_into_the_scan_file(tmp_path: Path) -> None:
    scans, microscope = tmp_path / "scans", tmp_path / "microscope"
    scans.mkdir()
    h5 = scan_file(scans, 17)
    before = read_counted_scan(h5)
    dm4_for(microscope, 17)
    link = link_microscope_metadata(h5, settings(microscope))
    assert link.status == "attached", link
    assert link.calibration["step_x_angstrom"] == pytest.approx(0.362)
    assert link.calibration["convergence_semiangle_mrad"] == pytest.approx(ALPHA)

    attrs, image = read_microscope(h5)
    assert attrs["step_y_angstrom"] == pytest.approx(0.362) and attrs["step_x_angstrom"] == pytest.approx(
        0.362
    )
    assert attrs["convergence_semiangle_mrad"] == pytest.approx(ALPHA)
    assert attrs["energy_ev"] == 300000.0 and attrs["scan_number"] == 17
    assert attrs["tags"]["Microscope Info"]["Microscope"] == "TEAM 0.5"
    assert attrs["tags"]["DigiScan"]["Sample Time"] == 11.0
    assert np.array_equal(image, haadf(ScanShape(9, 8)))
    with h5py.File(h5) as f:  # stempy's layout for STEM images
        assert f["stem/images"].shape == (1, 8, 8)
        assert list(f["stem/images"].attrs["names"]) == ["HAADF"]

    after = read_counted_scan(h5)  # the events are exactly what the writer wrote
    assert all(np.array_equal(a, b) for a, b in zip(before.events.ravel(), after.events.ravel()))
    assert np.array_equal(before.sector_masks, after.sector_masks)
    assert after.metadata["microscope"]["convergence_semiangle_mrad"] == pytest.approx(ALPHA)
    record = ScanRecord.load(record_path(h5))
    assert record.extra["microscope"]["status"] == "attached"
    assert record.sha256 == file_sha256(h5)  # the record holds the new file's checksum
    result = verify_scan(h5, 9, 8)
    assert result.ok and result.checksum_matches_record, result.problems
    assert not [p for p in scans.iterdir() if p.name.startswith(".")]  # no temporary left


def test_stempy_reads_the_file_with_its_microscope_metadata(tmp_path: Path) -> None:
    import stempy.io as stempy_io  # the test extra installs stempy (the oracle)

    h5 = scan_file(tmp_path, 17)
    dm4_for(tmp_path / "m", 17)
    assert link_microscope_metadata(h5, settings(tmp_path / "m")).status == "attached"
    sa = stempy_io.SparseArray.from_hdf5(str(h5))
    assert sa.scan_shape == (8, 9)
    assert sa.metadata["microscope"]["scan_number"] == 17


def test_a_scan_without_a_microscope_file_is_kept_with_the_reason(tmp_path: Path) -> None:
    h5 = scan_file(tmp_path, 18)
    sha = file_sha256(h5)
    link = link_microscope_metadata(h5, settings(tmp_path / "microscope"))
    assert link.status == "missing"
    assert "no microscope file scan18.dm4" in link.reason
    assert file_sha256(h5) == sha
    record = ScanRecord.load(record_path(h5))
    assert record.extra["microscope"]["reason"] == link.reason and record.sha256 == sha


def test_an_old_file_of_a_reused_scan_number_is_not_taken(tmp_path: Path) -> None:
    h5 = scan_file(tmp_path, 19)
    old = dm4_for(tmp_path / "m", 19)
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    link = link_microscope_metadata(h5, settings(tmp_path / "m", window=600))
    assert link.status == "missing" and "outside microscope.window = 600 s" in link.reason


def test_a_dm4_of_another_scan_is_refused(tmp_path: Path) -> None:
    h5 = scan_file(tmp_path, 20)
    path = dm4_for(tmp_path / "m", 21)
    path.rename(path.with_name("scan20.dm4"))
    link = link_microscope_metadata(h5, settings(tmp_path / "m"))
    assert link.status == "missing" and "is for scan 21, not 20" in link.reason


def test_an_unreadable_dm4_is_one_line_and_the_scan_file_is_untouched(tmp_path: Path) -> None:
    h5 = scan_file(tmp_path, 22)
    sha = file_sha256(h5)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "scan22.dm4").write_bytes(b"\x00\x00\x00\x04" + os.urandom(200))
    link = link_microscope_metadata(h5, settings(tmp_path / "m"))
    assert link.status == "failed"
    assert link.reason.startswith("cannot read DM4 file") and "\n" not in link.reason
    assert file_sha256(h5) == sha and verify_scan(h5, 9, 8).ok


def test_json_sidecar(tmp_path: Path) -> None:
    h5 = scan_file(tmp_path, 23)
    m = tmp_path / "m"
    m.mkdir()
    np.save(m / "haadf23.npy", haadf(ScanShape(9, 8)))
    sidecar = {"scan_number": 23, "step_size_angstrom": [0.5, 0.4], "convergence_semiangle_mrad": 30.0,
               "voltage_v": 200000, "tags": {"operator": "jc", "aperture": {"c2_um": 50}}, "haadf_npy": "haadf23.npy"}  # fmt: skip
    (m / "scan00023.json").write_text(json.dumps(sidecar))
    link = link_microscope_metadata(h5, settings(m, pattern="scan{scan:05d}.json"))
    assert link.status == "attached", link
    attrs, image = read_microscope(h5)
    assert (attrs["step_y_angstrom"], attrs["step_x_angstrom"]) == (0.5, 0.4)
    assert attrs["convergence_semiangle_mrad"] == 30.0 and attrs["energy_ev"] == 200000
    assert attrs["tags"]["aperture"]["c2_um"] == 50
    assert image.shape == (8, 8)


def test_the_convergence_angle_falls_back_on_the_setting(tmp_path: Path) -> None:
    path = write_dm4(
        tmp_path / "scan5.dm4", haadf(ScanShape(9, 8)), 0.05, "nm", {"Microscope Info": {"Voltage": 3e5}}
    )
    assert read_microscope_file(path, settings(tmp_path)).convergence_semiangle_mrad is None
    meta = read_microscope_file(path, settings(tmp_path, convergence_semiangle_mrad=21.0))
    assert meta.convergence_semiangle_mrad == 21.0
    assert meta.convergence_source == "microscope.convergence_semiangle_mrad"


def test_metadata_is_never_replaced(tmp_path: Path) -> None:
    h5 = scan_file(tmp_path, 24)
    dm4 = dm4_for(tmp_path / "m", 24)
    meta = read_microscope_file(dm4, settings(tmp_path / "m"))
    attach_microscope(h5, meta, None)
    sha = file_sha256(h5)
    with pytest.raises(MicroscopeMetadataError, match="already has /metadata/microscope"):
        attach_microscope(h5, meta, None)
    with pytest.raises(MicroscopeMetadataError, match="changed since it was written"):
        attach_microscope(scan_file(tmp_path, 25), meta, "0" * 64)
    assert file_sha256(h5) == sha
