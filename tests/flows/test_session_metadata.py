"""A local session with the microscope's files and a stored dark: the scan whose DM4 is there gets its
tags and HAADF in its HDF5 before verification and is analysed calibrated; the scan without one is still
written, verified and analysed, its record saying why, every output saying "uncalibrated"; the session
counts with the newest stored dark of its camera."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from counting.dark.stats import dark_from_sums, sums_of
from counting.dark.store import save_dark
from counting.geometry import ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.storage.durable import file_sha256
from stemstream_testing.dm4 import write_dm4
from streaming.protocol.record import ScanRecord
from tests.flows.test_session import artifacts_of, message, run_session

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.mark.timeout(180)
def test_session_adds_microscope_metadata_analyses_calibrated_and_uses_the_newest_dark(
    stemstream_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    microscope = tmp_path / "microscope"
    microscope.mkdir()
    tags = {"Microscope Info": {"Voltage": 300e3}, "4Dcamera Parameters": {"scan_number": 1, "convergence_semiangle_mrad": 22.0}}  # fmt: skip
    write_dm4(microscope / "scan1.dm4", np.ones((16, 15), np.float32), 0.04, "nm", tags)
    monkeypatch.setenv("STEMSTREAM_MICROSCOPE__DIR", str(microscope))
    monkeypatch.setenv("STEMSTREAM_MICROSCOPE__WAIT", "0")
    # A dark of the simulated detector (seed 0) in the store: the session counts with it.
    frames = SimulatedCamera(SimulatorConfig(ScanShape(1, 1), seed=0)).dark_frames(20)
    stored = save_dark(stemstream_env / "darks", dark_from_sums(sums_of([frames])), "simulated:0", "test")

    state, session_dir = run_session(
        stemstream_env, n_scans=2, scan_width=16, scan_height=16, postprocess=True
    )
    assert state.is_completed(), message(state)
    settings = json.loads((session_dir / "settings.json").read_text())
    assert settings["counting"]["dark"] == stored.path

    records = {r.scan_number: r for r in (ScanRecord.load(p) for p in (session_dir / "scans").glob("*.json"))}
    assert records[1].extra["microscope"]["status"] == "attached"
    assert records[2].extra["microscope"]["status"] == "missing"
    assert "no microscope file scan2.dm4" in records[2].extra["microscope"]["reason"]
    with h5py.File(records[1].path) as f:
        assert f["metadata/microscope"].attrs["convergence_semiangle_mrad"] == 22.0
        assert f["metadata/microscope"].attrs["step_x_angstrom"] == pytest.approx(0.4)
        assert f["stem/images"].shape == (1, 16, 15)
    with h5py.File(records[2].path) as f:
        assert "metadata/microscope" not in f and "stem" not in f
    assert all(r.verified for r in state.result())

    artifacts = artifacts_of(state.state_details.flow_run_id)
    text = {key: str(a.data) for key, a in artifacts.items() if key and key.startswith("analysis-")}
    assert len(text) == 2
    first = next(t for k, t in text.items() if k.endswith("00001"))
    second = next(t for k, t in text.items() if k.endswith("00002"))
    assert "**calibrated**" in first and "22 mrad" in first and "scan1.dm4" in first
    assert "**uncalibrated**" in second

    # The catalogue (SQLite in the output directory) has the link, the calibrations and the fitted numbers.
    from catalogue import open_catalogue
    from flows.settings import load_settings

    with open_catalogue(load_settings().catalogue, stemstream_env, create=False) as cat:
        one, two = cat.find_scan(Path(records[1].path).name), cat.find_scan(Path(records[2].path).name)
        assert one.microscope_file == str(microscope / "scan1.dm4")
        assert one.microscope_metadata["convergence_semiangle_mrad"] == 22.0
        assert one.microscope_metadata["step_x_angstrom"] == pytest.approx(0.4)
        assert two.microscope_file is None and "no microscope file scan2.dm4" in two.microscope_reason
        assert one.dark == stored.path
        by_kind = [{a.kind: a for a in scan.analyses} for scan in (one, two)]
        assert [sorted(k) for k in by_kind] == [["session", "stream-phase"]] * 2
        assert [k["session"].calibrated for k in by_kind] == [True, False]
        fitted = by_kind[0]["session"].results["fitted"]
        assert fitted["calibrated"] is True and "defocus_angstrom" in fitted
        assert by_kind[0]["session"].results["calibration"]["convergence_semiangle_mrad"] == 22.0
        # The stream's phase fit after verification: in each file (/phase), its stop record and the catalogue,
        # in nm where the microscope's metadata is, else uncalibrated.
        phases = [k["stream-phase"] for k in by_kind]
        assert [a.calibrated for a in phases] == [True, False] and [a.error for a in phases] == [None, None]
        assert [a.results["phase"]["units"] for a in phases] == ["nm", "scan px per detector px"]
    for number, analysis in zip((1, 2), phases, strict=True):
        assert analysis.results["phase"] == records[number].extra["phase"]
        assert analysis.results["in_file"] is True and records[number].sha256 == file_sha256(
            records[number].path
        )
        with h5py.File(records[number].path) as f:
            assert f["phase"].attrs["status"] == "ok" and f["phase/idpc"].shape == (16, 16)
            assert f["phase"].attrs["defocus"] == analysis.results["phase"]["defocus"]
