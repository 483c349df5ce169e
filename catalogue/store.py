"""The scan catalogue's API: record sessions, scans, darks, microscope metadata links, analyses and notes;
find a scan by its id or file name; search.

Plain code (no Prefect). Every write is an upsert by a natural key (session key, scan uid, dark path), so
recording again (a retry, a rebuild from the stop records) never duplicates; notes and analyses are only
ever added. Example::

    cat = Catalogue.open("sqlite:////data/out/catalogue.sqlite")
    cat.record_scan(ScanEntry(record, session_key=run_id, verified=True, dark="/data/dark.npy"))
    cat.record_dark(DarkEntry("/data/darks/dark-20261206.npy", mean=101.2, noise=3.4, hot_pixels=12))
    cat.link_metadata(record.scan_uuid, "/microscope/scan_0007.dm4", {"step_nm": 0.036})
    cat.record_analysis(record.scan_uuid, {"dpc_q_highpass": 0.03}, {"defocus_angstrom": 52.1})
    cat.add_note("FOURD_261206_1412_00007_00003.h5", "good area, thin edge")
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from catalogue.database import (
    AmbiguousScan,
    CatalogueMissing,
    ScanNotFound,
    make_engine,
    safe_url,
    sqlite_path,
    unavailable,
    upgrade,
)
from catalogue.entries import (
    DarkEntry,
    DarkView,
    ScanEntry,
    ScanQuery,
    ScanView,
    SessionEntry,
    finite,
    now_utc,
    utc,
)
from catalogue.models import AnalysisRow, DarkRow, NoteRow, ScanRow, SessionRow
from catalogue.views import dark_view, jsonable, scan_view

_HEX = re.compile(r"^[0-9a-f]{4,32}$")


class Catalogue:
    """One catalogue database (SQLite file or PostgreSQL server)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str, *, create: bool = True, connect_timeout: float = 5.0) -> Catalogue:
        """Connect and bring the schema up to date. ``create=False``: a missing SQLite file is an error
        (CatalogueMissing) instead of a new, empty catalogue. CatalogueUnavailable if unreachable."""
        path = sqlite_path(url)
        if path is not None and not path.exists():
            if not create:
                raise CatalogueMissing(
                    f"no scan catalogue at {path} (no session has recorded a scan there; set "
                    "catalogue.url, or rebuild it from stop records with `stemstream scans rebuild DIR`)"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = make_engine(url, connect_timeout)
        try:
            upgrade(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    @property
    def where(self) -> str:
        """The database, for messages (no password)."""
        return safe_url(self.engine.url.render_as_string(hide_password=False))

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        with unavailable(self.engine), Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    # ------------------------------------------------------------------------------------------ writes
    def record_session(self, entry: SessionEntry) -> None:
        """Record (or update) a session by its key; fields left None keep their stored values."""
        with self._session() as s:
            row = _session_row(s, entry.key)
            for name in ("session_number", "camera", "backend", "scans_dir", "started_at"):
                value = getattr(entry, name)
                if value is not None:
                    setattr(row, name, value)

    def end_session(self, key: str, state: str, message: str = "", ended_at: datetime | None = None) -> None:
        """Say how a session ended (state: completed, failed, cancelled, crashed)."""
        with self._session() as s:
            row = _session_row(s, key)
            row.state, row.message, row.ended_at = state, message[:2000], ended_at or now_utc()

    def record_scan(self, entry: ScanEntry) -> str:
        """Record (or update) a scan by its uid; returns the uid. Notes and analyses are kept."""
        uid = entry.uid
        for attempt in range(2):  # a concurrent insert of the same uid: then update it
            try:
                with self._session() as s:
                    row = s.scalar(select(ScanRow).where(ScanRow.uid == uid))
                    if row is None:
                        row = ScanRow(uid=uid, microscope_metadata={}, record={})
                        s.add(row)
                    _fill_scan(s, row, entry)
                return uid
            except IntegrityError:
                if attempt:
                    raise
        return uid

    def record_dark(self, entry: DarkEntry) -> int:
        """Record (or update) a dark reference by its path; returns its catalogue id."""
        with self._session() as s:
            row = _dark_row(s, entry.path)
            for name in ("created_at", "frames", "mean", "noise", "hot_pixels", "sha256", "source"):
                value = getattr(entry, name)
                if value is not None:
                    setattr(row, name, finite(value) if isinstance(value, float) else value)
            if entry.stats:
                row.stats = jsonable(entry.stats)
            s.flush()
            return row.id

    def link_metadata(
        self, scan: str, path: str | None, tags: dict | None = None, reason: str | None = None
    ) -> None:
        """Link a scan to the microscope's file for it (e.g. a DM4) and store its tags; or, with path
        None, say why there is none (``reason``)."""
        with self._session() as s:
            row = _find(s, scan)
            row.microscope_file = str(path) if path is not None else None
            row.microscope_metadata = jsonable(tags or {})
            row.microscope_reason = reason if path is None else None

    def record_analysis(
        self,
        scan: str,
        params: dict,
        results: dict,
        *,
        images: dict[str, str] | None = None,
        calibrated: bool | None = None,
        kind: str = "reanalysis",
        error: str | None = None,
        uid: str | None = None,
    ) -> int:
        """Add an analysis of a scan beside the earlier ones (its parameters, results, images);
        returns its id. ``kind``: "session" for the analysis during acquisition, else "reanalysis".
        ``uid``: the analysis's own id; one the catalogue has already is not added again (a replay)."""
        with self._session() as s:
            if uid is not None and (known := s.scalar(select(AnalysisRow.id).where(AnalysisRow.uid == uid))):
                return known
            row = _find(s, scan)
            analysis = AnalysisRow(
                scan=row,
                created_at=now_utc(),
                kind=kind,
                params=jsonable(params),
                results=jsonable(results),
                images={k: str(v) for k, v in (images or {}).items()},
                calibrated=calibrated,
                error=error,
                uid=uid,
            )
            s.add(analysis)
            s.flush()
            return analysis.id

    def add_note(self, scan: str, text: str, author: str | None = None) -> int:
        """Add a person's note to a scan; returns its id."""
        if not text.strip():
            raise ValueError("a note needs some text")
        with self._session() as s:
            row = _find(s, scan)
            note = NoteRow(scan=row, text=text.strip(), author=author, created_at=now_utc())
            s.add(note)
            s.flush()
            return note.id

    # ------------------------------------------------------------------------------------------- reads
    def find_scan(self, ref: str) -> ScanView:
        """The scan with this uid (or a unique prefix of it), file name, path, or id (unique in its
        directory, so accepted when one scan in the catalogue has it). ScanNotFound / AmbiguousScan."""
        with self._session() as s:
            return scan_view(_find(s, ref))

    def search(self, query: ScanQuery = ScanQuery()) -> list[ScanView]:
        """Scans matching every filter given, newest first."""
        q = select(ScanRow).options(*_LOAD)
        if query.session:
            sessions = select(SessionRow.id).where(
                or_(
                    SessionRow.key == query.session,
                    SessionRow.key.startswith(query.session),
                    SessionRow.session_number == int(query.session) if query.session.isdigit() else False,
                )
            )
            q = q.where(ScanRow.session_id.in_(sessions))
        for column, low, high in (
            (ScanRow.started_at, query.since, query.until),
            (ScanRow.electrons_per_frame, query.dose_min, query.dose_max),
            (ScanRow.completeness, query.completeness_min, query.completeness_max),
        ):
            if low is not None:
                q = q.where(column >= low)
            if high is not None:
                q = q.where(column <= high)
        for column, value in (
            (ScanRow.scan_width, query.width),
            (ScanRow.scan_height, query.height),
            (ScanRow.status, query.status),
            (ScanRow.scan_number, query.scan_number),
        ):
            if value is not None:
                q = q.where(column == value)
        if query.note:
            noted = select(NoteRow.scan_id).where(NoteRow.text.ilike(f"%{_escape_like(query.note)}%", "\\"))
            q = q.where(ScanRow.id.in_(noted))
        q = q.order_by(ScanRow.started_at.desc(), ScanRow.id.desc()).limit(query.limit)
        with self._session() as s:
            return [scan_view(row) for row in s.scalars(q)]

    def scan_uids(self) -> set[str]:
        """The uid of every scan recorded."""
        with self._session() as s:
            return set(s.scalars(select(ScanRow.uid)))

    def darks(self) -> list[DarkView]:
        """Every dark reference, newest first."""
        with self._session() as s:
            rows = s.scalars(select(DarkRow).order_by(DarkRow.created_at.desc(), DarkRow.id.desc()))
            return [dark_view(r) for r in rows]

    def newest_dark(self) -> DarkView | None:
        """The newest dark reference whose file still exists, or None."""
        return next((d for d in self.darks() if os.path.exists(d.path)), None)


# ---------------------------------------------------------------------------------------------- helpers
_LOAD = (
    selectinload(ScanRow.notes),
    selectinload(ScanRow.analyses),
    selectinload(ScanRow.session),
    selectinload(ScanRow.dark),
)


def _session_row(s: Session, key: str) -> SessionRow:
    row = s.scalar(select(SessionRow).where(SessionRow.key == key))
    if row is None:
        row = SessionRow(key=key)
        s.add(row)
        s.flush()
    return row


def _dark_row(s: Session, path: str) -> DarkRow:
    path = os.path.abspath(os.path.expanduser(str(path)))  # one row per file, however it was named
    row = s.scalar(select(DarkRow).where(DarkRow.path == path))
    if row is None:
        created = utc(os.path.getmtime(path)) if os.path.exists(path) else None
        row = DarkRow(path=path, created_at=created, source="file", stats={})
        s.add(row)
        s.flush()
    return row


def _fill_scan(s: Session, row: ScanRow, entry: ScanEntry) -> None:
    r = entry.record
    row.scan_id, row.scan_number = r.scan_id, r.scan_number
    row.path = r.path
    row.file_name = (
        Path(r.path).name if r.path else (Path(entry.record_file).name if entry.record_file else None)
    )
    row.status = str(r.status)
    row.scan_width, row.scan_height = r.scan_width, r.scan_height
    row.expected_frames, row.frames_written, row.complete_frames = (
        r.expected_frames,
        r.frames_written,
        r.complete_frames,
    )
    row.completeness, row.events = float(r.completeness), int(r.events)
    row.electrons_per_frame = float(r.events_per_frame)
    bg, xray = (list(r.thresholds) + [None, None])[:2]
    row.background_threshold, row.xray_threshold = finite(bg), finite(xray)
    row.started_at, row.ended_at, row.written_at = (  # a scan without data is dated by its end
        utc(r.first_data_time or r.last_data_time or r.written_time),
        utc(r.last_data_time),
        utc(r.written_time),
    )
    row.sha256, row.error = r.sha256, r.error
    row.record = jsonable(r.to_json())
    row.recorded_at = now_utc()
    if entry.session_key:
        row.session = _session_row(s, entry.session_key)
    if entry.verified is not None:
        row.verified = entry.verified
    if entry.dark:
        row.dark = _dark_row(s, entry.dark)
    if entry.dark_reference:
        row.dark_reference = entry.dark_reference
    micro = r.extra.get("microscope")  # the link the session wrote into the stop record (tasks/microscope.py)
    if isinstance(micro, dict) and micro.get("status") not in (None, "off"):
        attached = micro.get("status") == "attached"
        row.microscope_file = micro.get("file") if attached else None
        row.microscope_metadata = jsonable(micro.get("calibration") or {})
        row.microscope_reason = None if attached else (micro.get("reason") or str(micro.get("status")))


def _find(s: Session, ref: str) -> ScanRow:
    ref = str(ref).strip()
    if not ref:
        raise ScanNotFound("no scan id given")
    name = Path(ref).name
    steps = [
        ScanRow.uid == ref.lower(),
        or_(ScanRow.file_name == name, ScanRow.file_name == f"{name}.h5", ScanRow.path == ref),
    ]
    if _HEX.match(ref.lower()):
        steps.append(ScanRow.uid.startswith(ref.lower()))
    if ref.isdigit():
        steps.append(ScanRow.scan_id == int(ref))
    if os.path.sep in ref:
        steps.insert(2, ScanRow.path == os.path.realpath(ref))
    for where in steps:
        rows = list(s.scalars(select(ScanRow).options(*_LOAD).where(where).limit(11)))
        if len(rows) == 1:
            return rows[0]
        if rows:
            shown = ", ".join(f"{r.uid[:8]} ({r.file_name})" for r in rows[:10])
            raise AmbiguousScan(
                f"{len(rows) if len(rows) <= 10 else 'more than 10'} scans match {ref!r}: {shown}; "
                "give more of the uid or the file name"
            )
    raise ScanNotFound(f"no scan {ref!r} in the catalogue (give its uid, file name or id)")


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
