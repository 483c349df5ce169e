"""Audit finding M6: the microscope-metadata step never leaves the scan's HDF5 and its stop record out of
step. The new record is staged before the file is replaced and committed after; a failed record write is
reported, not raised, and a step stopped at any point leaves a pair that verifies.

The fixtures are tests/tasks/test_microscope.py's: a real counted scan with its stop record, a real DM4."""

from __future__ import annotations

import errno
from dataclasses import replace
from pathlib import Path

import h5py
import pytest

from counting.microscope_meta import attach_microscope
from streaming.protocol.record import ScanRecord, record_path
from streaming.protocol.staged import pending_record_path
from tasks.microscope import link_microscope_metadata, read_microscope_file
from tasks.verify import verify_scan
from tests.tasks.test_microscope import dm4_for, scan_file, settings


class Crash(BaseException):
    """The step's process dying at a given point."""


def test_a_stop_record_that_cannot_be_written_is_reported_and_the_file_is_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Before: the HDF5 was replaced, then the record write raised (ENOSPC): the session task failed and
    the scan failed verification for good (checksum mismatch)."""
    h5 = scan_file(tmp_path / "scans")
    before = h5.read_bytes()
    dm4_for(tmp_path / "mic", 17)

    def no_space(self: ScanRecord, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ScanRecord, "save", no_space)
    link = link_microscope_metadata(h5, settings(tmp_path / "mic"))
    monkeypatch.undo()
    assert link.status == "failed" and "No space left on device" in link.reason
    assert h5.read_bytes() == before and not pending_record_path(h5).exists()
    result = verify_scan(h5)
    assert result.ok and result.checksum_matches_record is True


@pytest.mark.parametrize("replaced", [False, True])
def test_a_step_stopped_midway_leaves_a_pair_that_verifies(tmp_path: Path, replaced: bool):
    """The process dies after the new record is staged: before the file is replaced, or after it and
    before the record is committed. Verification settles it by the file's checksum."""
    h5 = scan_file(tmp_path / "scans")
    meta = read_microscope_file(dm4_for(tmp_path / "mic", 17), settings(tmp_path / "mic"))
    record = ScanRecord.load(record_path(h5))

    def stage(digest: str) -> None:
        replace(record, sha256=digest, extra={"microscope": {"status": "attached"}}).save(
            pending_record_path(h5)
        )
        if not replaced:
            raise Crash

    if replaced:
        attach_microscope(h5, meta, record.sha256, before_replace=stage)
    else:
        with pytest.raises(Crash):
            attach_microscope(h5, meta, record.sha256, before_replace=stage)
    assert pending_record_path(h5).exists()
    result = verify_scan(h5)
    assert result.ok and result.checksum_matches_record is True, result.problems
    assert not pending_record_path(h5).exists()
    settled = ScanRecord.load(record_path(h5))
    assert ("microscope" in settled.extra) is replaced
    with h5py.File(h5) as f:
        assert ("metadata/microscope" in f) is replaced


def test_the_step_commits_the_record_with_the_file(tmp_path: Path):
    h5 = scan_file(tmp_path / "scans")
    dm4_for(tmp_path / "mic", 17)
    link = link_microscope_metadata(h5, settings(tmp_path / "mic"))
    assert link.status == "attached" and not pending_record_path(h5).exists()
    record = ScanRecord.load(record_path(h5))
    assert record.extra["microscope"]["status"] == "attached"
    assert verify_scan(h5).checksum_matches_record is True
