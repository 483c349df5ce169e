"""ORM rows to the typed views callers get, and values made JSON-safe for the database."""

from __future__ import annotations

from datetime import datetime

from catalogue.entries import AnalysisView, DarkView, NoteView, ScanView, finite
from catalogue.models import DarkRow, ScanRow


def scan_view(row: ScanRow) -> ScanView:
    """A scan row (its session, dark, notes and analyses loaded) as the typed view callers get."""
    return ScanView(
        uid=row.uid,
        scan_id=row.scan_id,
        scan_number=row.scan_number,
        session=row.session.key if row.session else None,
        session_number=row.session.session_number if row.session else None,
        file_name=row.file_name,
        path=row.path,
        status=row.status,
        verified=row.verified,
        scan_width=row.scan_width,
        scan_height=row.scan_height,
        expected_frames=row.expected_frames,
        frames_written=row.frames_written,
        complete_frames=row.complete_frames,
        completeness=row.completeness,
        events=row.events,
        electrons_per_frame=row.electrons_per_frame,
        thresholds=(row.background_threshold, row.xray_threshold),
        started_at=row.started_at,
        ended_at=row.ended_at,
        written_at=row.written_at,
        sha256=row.sha256,
        error=row.error,
        dark=row.dark.path if row.dark else None,
        dark_reference=row.dark_reference,
        microscope_file=row.microscope_file,
        microscope_metadata=dict(row.microscope_metadata or {}),
        microscope_reason=row.microscope_reason,
        recorded_at=row.recorded_at,
        notes=tuple(NoteView(n.text, n.author, n.created_at) for n in row.notes),
        analyses=tuple(
            AnalysisView(
                a.id,
                a.kind,
                a.created_at,
                dict(a.params),
                dict(a.results),
                dict(a.images),
                a.calibrated,
                a.error,
            )
            for a in row.analyses
        ),
    )


def dark_view(r: DarkRow) -> DarkView:
    """A dark row as the typed view callers get."""
    return DarkView(
        r.id, r.path, r.created_at, r.frames, r.mean, r.noise, r.hot_pixels, r.sha256, r.source, dict(r.stats)
    )


def jsonable(value: object) -> object:
    """JSON-safe: NaN/inf become None, numpy scalars and arrays plain, paths strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return finite(value)
    if hasattr(value, "tolist"):  # numpy
        return jsonable(value.tolist())
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
