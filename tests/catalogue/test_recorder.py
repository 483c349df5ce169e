"""Recording in the background: a database that goes down mid-session loses nothing (a real PostgreSQL
server stopped and started again), and what a session could not record at all is kept in a pending
file that `scans rebuild` replays."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from catalogue import Catalogue, ScanEntry, ScanQuery, SessionEntry
from catalogue.rebuild import rebuild
from catalogue.recorder import PENDING_NAME, Recorder
from stemstream_testing.catalogue_scans import write_scan
from stemstream_testing.postgres import PostgresServer


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _count(url: str) -> int:
    with Catalogue.open(url) as cat:
        return len(cat.search(ScanQuery()))


def test_database_down_mid_session_loses_nothing(postgres: PostgresServer, tmp_path: Path, caplog) -> None:
    url = postgres.create_database("recorder_down")
    log = logging.getLogger("test.recorder")
    caplog.set_level(logging.INFO, logger="test.recorder")
    scans = [write_scan(tmp_path / "scans", n, n, seed=n) for n in (1, 2, 3, 4)]
    recorder = Recorder(
        lambda: Catalogue.open(url, connect_timeout=2), tmp_path / PENDING_NAME, log=log, retry_every=60
    )
    try:
        recorder.session(SessionEntry("run-down", 7, "simulated", "local"))
        recorder.scan(ScanEntry(scans[0], session_key="run-down", verified=True))
        _wait(lambda: _count(url) == 1, 30, "scan 1 in the catalogue")
        postgres.stop()
        for record in scans[1:3]:  # handed over while the database is down: neither waits nor fails
            recorder.scan(ScanEntry(record, session_key="run-down", verified=True))
        _wait(lambda: "unreachable" in caplog.text, 30, "the warning that the catalogue is unreachable")
        assert "entries kept" in caplog.text or "entry kept" in caplog.text
        postgres.restart()
        recorder.scan(
            ScanEntry(scans[3], session_key="run-down", verified=True)
        )  # the next scan: retried now
        recorder.analysis(scans[3].path, {"p": 1}, {"r": 2}, kind="session")  # named by its path
        recorder.end_session("run-down", "completed", "4 scan(s) verified")
        report = recorder.close(timeout=30)
    finally:
        if not postgres.running:
            postgres.restart()
    assert (report.pending, report.pending_file) == (0, None)
    assert "reachable again" in caplog.text
    with Catalogue.open(url) as cat:
        found = cat.search(ScanQuery(session="run-down"))
        assert sorted(s.scan_number for s in found) == [1, 2, 3, 4]
        assert all(s.verified for s in found)
        assert len(cat.find_scan(scans[3].scan_uuid).analyses) == 1
    assert not (tmp_path / PENDING_NAME).exists()


def test_a_database_that_stays_down_leaves_a_pending_file_that_rebuild_replays(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.create_database("recorder_pending")
    session_dir = tmp_path / "sessions" / "run-p"
    scans = [write_scan(session_dir / "scans", n, n, seed=n) for n in (1, 2)]
    postgres.stop()
    try:
        recorder = Recorder(lambda: Catalogue.open(url, connect_timeout=1), session_dir / PENDING_NAME)
        recorder.session(SessionEntry("run-p", 8))
        for record in scans:
            recorder.scan(ScanEntry(record, session_key="run-p", verified=True))
        recorder.analysis(scans[0].scan_uuid, {"a": 1}, {"b": 2}, kind="session")
        report = recorder.close(timeout=3)
    finally:
        postgres.restart()
    assert report.pending == 4 and report.pending_file == str(session_dir / PENDING_NAME)
    assert "unreachable" in (report.error or "")
    with Catalogue.open(url) as cat:
        done = rebuild(cat, tmp_path)
        assert (done.pending_entries, done.scans) == (4, 2)
        found = cat.search(ScanQuery(session="run-p"))
        assert sorted(s.scan_number for s in found) == [1, 2] and all(s.verified for s in found)
        assert len(cat.find_scan(scans[0].scan_uuid).analyses) == 1
    assert not (session_dir / PENDING_NAME).exists()  # replayed: renamed, so never replayed twice
