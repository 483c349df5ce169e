"""The catalogue on SQLite and on a real PostgreSQL server: sessions, reused scan numbers, notes,
analyses side by side, searches, the schema made by the migrations, rebuilding from stop records."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from catalogue import (
    AmbiguousScan,
    Catalogue,
    DarkEntry,
    ScanEntry,
    ScanNotFound,
    ScanQuery,
    SessionEntry,
)
from catalogue.database import current_revision, head_revision
from catalogue.models import Base
from catalogue.rebuild import rebuild
from catalogue.recorder import PENDING_NAME
from stemstream_testing.catalogue_scans import write_scan
from streaming.protocol.record import ScanRecord

JAN = datetime(2026, 1, 15, 12, 0).timestamp()
MAR = datetime(2026, 3, 15, 12, 0).timestamp()


def _two_sessions(root: Path) -> dict[str, ScanRecord]:
    """Session A: scan 1 twice (ids 1 and 2, 8x8); session B in its own directory: scan 1 again (id 1,
    16x8), in March."""
    a, b = root / "sessions" / "run-a" / "scans", root / "sessions" / "run-b" / "scans"
    return {
        "a1": write_scan(a, 1, 1, started=JAN, seed=1),
        "a1again": write_scan(a, 1, 2, started=JAN + 60, seed=2),
        "b1": write_scan(b, 1, 1, 16, 8, started=MAR, seed=3, dose=40.0),
    }


def _record_all(cat: Catalogue, scans: dict[str, ScanRecord]) -> None:
    cat.record_session(SessionEntry("run-a", 11, "simulated", "local"))
    cat.record_session(SessionEntry("run-b", 12, "simulated", "local"))
    for name, record in scans.items():
        cat.record_scan(ScanEntry(record, session_key=f"run-{name[0]}", verified=True))


def test_two_sessions_and_reused_scan_numbers_are_distinct_scans(db_url: str, tmp_path: Path) -> None:
    scans = _two_sessions(tmp_path)
    with Catalogue.open(db_url) as cat:
        _record_all(cat, scans)
        _record_all(cat, scans)  # recording again (a retry) duplicates nothing
        assert len(cat.search()) == 3
        assert {s.uid for s in cat.search(ScanQuery(scan_number=1))} == {r.scan_uuid for r in scans.values()}
        in_a = cat.search(ScanQuery(session="run-a"))
        assert sorted(s.scan_id for s in in_a) == [1, 2]
        assert [s.uid for s in cat.search(ScanQuery(session="12"))] == [scans["b1"].scan_uuid]
        # found by uid, a unique uid prefix, file name (with or without .h5) or path
        b1 = scans["b1"]
        name = Path(b1.path).name
        for ref in (b1.scan_uuid, b1.scan_uuid[:8], name, name[:-3], b1.path):
            assert cat.find_scan(ref).uid == b1.scan_uuid, ref
        assert cat.find_scan("2").uid == scans["a1again"].scan_uuid  # id 2: one scan has it
        with pytest.raises(AmbiguousScan, match="2 scans match '1'"):
            cat.find_scan("1")  # id 1 in both sessions' directories
        with pytest.raises(ScanNotFound, match="no scan 'nothing-like-it'"):
            cat.find_scan("nothing-like-it")
        view = cat.find_scan(b1.scan_uuid)
        assert (view.session, view.session_number, view.shape, view.verified) == ("run-b", 12, "16x8", True)
        assert view.started_at == datetime.fromtimestamp(MAR, UTC).replace(tzinfo=None)


def test_notes_and_searches_by_date_shape_dose_and_note(db_url: str, tmp_path: Path) -> None:
    scans = _two_sessions(tmp_path)
    with Catalogue.open(db_url) as cat:
        _record_all(cat, scans)
        cat.add_note(Path(scans["a1again"].path).name, "Thin EDGE, good area", author="mia")
        cat.add_note(scans["a1again"].scan_uuid, "defocus series next")
        cat.add_note(scans["b1"].scan_uuid, "drift 50% at the end")
        with pytest.raises(ValueError, match="needs some text"):
            cat.add_note(scans["b1"].scan_uuid, "   ")
        by_note = cat.search(ScanQuery(note="edge"))
        assert [s.uid for s in by_note] == [scans["a1again"].scan_uuid]
        assert [n.text for n in by_note[0].notes] == ["Thin EDGE, good area", "defocus series next"]
        assert by_note[0].notes[0].author == "mia"
        assert [s.uid for s in cat.search(ScanQuery(note="50%"))] == [scans["b1"].scan_uuid]  # % is text
        assert cat.search(ScanQuery(note="5_%")) == []
        feb = datetime(2026, 2, 1)
        assert {s.uid for s in cat.search(ScanQuery(until=feb))} == {
            scans["a1"].scan_uuid,
            scans["a1again"].scan_uuid,
        }
        assert [s.uid for s in cat.search(ScanQuery(since=feb))] == [scans["b1"].scan_uuid]
        assert [s.uid for s in cat.search(ScanQuery(width=16, height=8))] == [scans["b1"].scan_uuid]
        assert len(cat.search(ScanQuery(width=8, height=8))) == 2
        assert [s.uid for s in cat.search(ScanQuery(dose_min=30))] == [scans["b1"].scan_uuid]
        assert len(cat.search(ScanQuery(completeness_min=1.0, status="complete"))) == 3
        newest_first = cat.search()
        assert newest_first[0].uid == scans["b1"].scan_uuid and newest_first[-1].uid == scans["a1"].scan_uuid


def test_reanalysis_recorded_beside_the_first(db_url: str, tmp_path: Path) -> None:
    from tasks.analysis.reanalyse import parse_params, reanalyse
    from tasks.settings import AnalysisSettings

    record = write_scan(tmp_path / "scans", 5, 1, 12, 12, dose=60.0)
    with Catalogue.open(db_url) as cat:
        cat.record_scan(ScanEntry(record, session_key="run-x"))
        first = cat.record_analysis(
            record.scan_uuid, {"dpc_q_highpass": 0.03}, {"probe_radius_px": 2.0}, kind="session"
        )
        params = parse_params(["dpc_q_highpass=0.05", "parallax=false"])
        done = reanalyse(cat, Path(record.path).name, AnalysisSettings(), params, tmp_path / "out")
        analyses = cat.find_scan(record.scan_uuid).analyses
    assert [a.id for a in analyses] == [first, done.analysis_id]
    assert [a.kind for a in analyses] == ["session", "reanalysis"]
    again = analyses[1]
    assert again.params["dpc_q_highpass"] == 0.05 and again.params["parallax"] is False
    assert again.params["changed"] == {"dpc_q_highpass": 0.05, "parallax": False}
    assert again.results["probe_radius_px"] > 0 and "parallax" not in again.results
    assert set(again.images) >= {"bf", "dpc"} and all(Path(p).is_file() for p in again.images.values())
    assert analyses[0].results == {"probe_radius_px": 2.0}  # the first is kept as it was


def test_darks_and_microscope_metadata(db_url: str, tmp_path: Path) -> None:
    record = write_scan(tmp_path / "scans", 2, 1)
    dark = tmp_path / "dark.npy"
    dark.write_bytes(b"not read by the catalogue")
    with Catalogue.open(db_url) as cat:
        dark_id = cat.record_dark(
            DarkEntry(str(dark), frames=100, mean=101.5, noise=float("nan"), source="simulated")
        )
        assert cat.record_dark(DarkEntry(str(dark), hot_pixels=3)) == dark_id  # by path: updated
        cat.record_scan(ScanEntry(record, dark=str(dark)))
        cat.link_metadata(
            record.scan_uuid, "/microscope/scan_0002.dm4", {"step_nm": 0.036, "semiangle_mrad": 21.4}
        )
        view = cat.find_scan(record.scan_uuid)
        assert view.dark == str(dark)
        assert view.microscope_file == "/microscope/scan_0002.dm4"
        assert view.microscope_metadata == {"step_nm": 0.036, "semiangle_mrad": 21.4}
        newest = cat.newest_dark()
        assert newest is not None and (newest.frames, newest.mean, newest.noise, newest.hot_pixels) == (
            100,
            101.5,
            None,
            3,
        )
        cat.link_metadata(record.scan_uuid, None, reason="no DM4 for scan 2 within 120 s")
        assert cat.find_scan(record.scan_uuid).microscope_reason == "no DM4 for scan 2 within 120 s"


def test_the_schema_is_the_migrations_and_matches_the_models(db_url: str) -> None:
    with Catalogue.open(db_url) as cat:
        assert current_revision(cat.engine) == head_revision() == "0002"
        with cat.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], diff
    with Catalogue.open(db_url) as cat:  # opening again: already at head, nothing to do
        assert current_revision(cat.engine) == "0002"


def test_rebuild_from_stop_records_and_pending_entries(db_url: str, tmp_path: Path) -> None:
    scans = _two_sessions(tmp_path)
    for run in ("run-a", "run-b"):
        session_dir = tmp_path / "sessions" / run
        settings = session_dir / "settings.json"
        settings.write_text(json.dumps({"streaming": {"session_id": 11 if run == "run-a" else 12}}))
        (session_dir / "session.json").write_text(
            json.dumps(
                {
                    "flow_run": run,
                    "backend": "local",
                    "settings_file": str(settings),
                    "scans_dir": str(session_dir / "scans"),
                }
            )
        )
    pending = tmp_path / "sessions" / "run-b" / PENDING_NAME
    pending.write_text(
        json.dumps([
            {"kind": "scan", "data": ScanEntry(scans["b1"], session_key="run-b", verified=True).to_json()},
            {"kind": "analysis", "data": {"scan": scans["b1"].scan_uuid, "params": {"p": 1}, "results": {"r": 2}, "kind": "session"}},
            {"kind": "end", "data": {"key": "run-b", "state": "completed", "message": "1 scan(s) verified"}},
        ])
    )  # fmt: skip
    with Catalogue.open(db_url) as cat:
        report = rebuild(cat, tmp_path)
        assert (report.scans, report.new_scans, report.sessions, report.pending_entries) == (3, 2, 2, 3)
        assert not pending.exists() and pending.with_name("catalogue-pending.recorded.json").exists()
        again = rebuild(cat, tmp_path)  # idempotent: nothing new, the analysis not added twice
        assert (again.scans, again.new_scans, again.pending_entries) == (3, 0, 0)
        found = {s.uid: s for s in cat.search()}
        assert set(found) == {r.scan_uuid for r in scans.values()}
        b1 = found[scans["b1"].scan_uuid]
        assert (b1.session, b1.session_number, b1.verified, len(b1.analyses)) == ("run-b", 12, True, 1)
        assert found[scans["a1"].scan_uuid].session == "run-a"
        assert found[scans["a1"].scan_uuid].verified is None  # a stop record does not say


def test_a_record_without_uuid_gets_a_stable_key(tmp_path: Path) -> None:
    record = write_scan(tmp_path / "scans", 4, 7)
    record.scan_uuid = ""
    entry = ScanEntry(record)
    assert entry.uid == ScanEntry(record).uid and len(entry.uid) == 32
    other = write_scan(tmp_path / "other", 4, 7)
    other.scan_uuid = ""
    assert ScanEntry(other).uid != entry.uid


def test_a_failed_scan_without_data_is_found_by_the_time_it_ended(db_url: str, tmp_path: Path) -> None:
    from dataclasses import replace

    from streaming.protocol.record import ScanStatus

    record = write_scan(tmp_path / "scans", 9, 3, started=MAR)
    failed = replace(
        record,
        status=ScanStatus.FAILED,
        first_data_time=0.0,
        frames_written=0,
        events=0,
        thresholds=[float("nan")] * 2,
    )
    with Catalogue.open(db_url) as cat:
        cat.record_scan(ScanEntry(failed, verified=False))
        found = cat.search(ScanQuery(since=datetime(2026, 3, 1), status="failed"))
    assert [s.uid for s in found] == [record.scan_uuid]
    assert found[0].started_at == datetime.fromtimestamp(MAR + 1.0, UTC).replace(tzinfo=None)
    assert found[0].thresholds == (None, None) and found[0].verified is False


def test_rebuild_after_the_files_moved_points_at_their_new_place(db_url: str, tmp_path: Path) -> None:
    record = write_scan(tmp_path / "before" / "scans", 6, 1)
    with Catalogue.open(db_url) as cat:
        rebuild(cat, tmp_path / "before")
        (tmp_path / "before").rename(tmp_path / "after")  # e.g. copied to the facility's archive
        report = rebuild(cat, tmp_path / "after")
        (scan,) = cat.search()
    assert (report.scans, report.new_scans) == (1, 0) and scan.uid == record.scan_uuid
    assert scan.path == str((tmp_path / "after" / "scans" / Path(record.path).name).resolve())
