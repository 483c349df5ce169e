"""Typed records that cross into and out of the catalogue: what to record, what to search for, and what
comes back. Plain dataclasses: the callers never see the ORM rows."""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from streaming.protocol.record import ScanRecord


def utc(timestamp: float | None) -> datetime | None:
    """A Unix time as a naive UTC datetime (how the catalogue stores times); None for 0 or None."""
    if not timestamp:
        return None
    return datetime.fromtimestamp(timestamp, UTC).replace(tzinfo=None)


def now_utc() -> datetime:
    """Now, as the catalogue stores times (naive UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def scan_uid(record: ScanRecord, record_file: Path | None = None) -> str:
    """The scan's unique key: the uuid its writer gave it, or for a record written before uuids existed, one
    derived from where it is and its id and start, so rebuilding twice gives the same key."""
    if record.scan_uuid:
        return record.scan_uuid
    where = record.path or (str(record_file) if record_file else "")
    anchor = os.path.realpath(where) if where else ""
    name = f"stemstream-scan:{anchor}:{record.scan_id}:{record.scan_number}:{record.first_data_time!r}"
    return uuid.uuid5(uuid.NAMESPACE_URL, name).hex


@dataclass(frozen=True)
class SessionEntry:
    """A session to record (upserted by ``key``: the flow run id, i.e. the session directory's name)."""

    key: str
    session_number: int | None = None
    camera: str | None = None
    backend: str | None = None
    scans_dir: str | None = None
    started_at: datetime | None = None


@dataclass(frozen=True)
class ScanEntry:
    """A scan to record: its stop record and what the session learned about it (upserted by uid)."""

    record: ScanRecord
    session_key: str | None = None
    verified: bool | None = None
    dark: str | None = None  # path of the dark reference it was counted with (None: none, or unknown)
    dark_reference: str | None = None  # what the file says it was counted against
    record_file: str | None = None  # the stop record's path (for records without a scan file)

    @property
    def uid(self) -> str:
        """The scan's unique key."""
        return scan_uid(self.record, Path(self.record_file) if self.record_file else None)

    def to_json(self) -> dict:
        """JSON form (for the list of scans a session could not record yet)."""
        return {
            "record": self.record.to_json(),
            "session_key": self.session_key,
            "verified": self.verified,
            "dark": self.dark,
            "dark_reference": self.dark_reference,
            "record_file": self.record_file,
        }

    @classmethod
    def from_json(cls, data: dict) -> ScanEntry:
        """The entry from its JSON form."""
        return cls(**{**data, "record": ScanRecord.from_json(data["record"])})

    @classmethod
    def from_stop_record(cls, path: Path, **known: object) -> ScanEntry:
        """The entry of a stop record file (``<scan>.json``)."""
        return cls(ScanRecord.load(path), record_file=str(path), **known)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DarkEntry:
    """A dark reference to record (upserted by path): where it is and its statistics."""

    path: str
    created_at: datetime | None = None
    frames: int | None = None
    mean: float | None = None
    noise: float | None = None
    hot_pixels: int | None = None
    sha256: str | None = None
    source: str | None = None  # instrument, simulated, file
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ScanQuery:
    """Filters of a search; None means no filter. Dates are naive UTC."""

    session: str | None = None  # session key (or its start), or the 5-digit session number
    since: datetime | None = None
    until: datetime | None = None
    width: int | None = None
    height: int | None = None
    dose_min: float | None = None  # counted electrons per frame
    dose_max: float | None = None
    completeness_min: float | None = None  # fraction 0..1
    completeness_max: float | None = None
    status: str | None = None
    note: str | None = None  # text in any of its notes (case-insensitive)
    scan_number: int | None = None
    limit: int = 200


@dataclass(frozen=True)
class NoteView:
    """A note as stored."""

    text: str
    author: str | None
    created_at: datetime


@dataclass(frozen=True)
class AnalysisView:
    """An analysis as stored."""

    id: int
    kind: str
    created_at: datetime
    params: dict
    results: dict
    images: dict
    calibrated: bool | None
    error: str | None


@dataclass(frozen=True)
class DarkView:
    """A dark reference as stored."""

    id: int
    path: str
    created_at: datetime | None
    frames: int | None
    mean: float | None
    noise: float | None
    hot_pixels: int | None
    sha256: str | None
    source: str | None
    stats: dict


@dataclass(frozen=True)
class ScanView:
    """A scan as stored, with its session, notes and analyses."""

    uid: str
    scan_id: int
    scan_number: int
    session: str | None
    session_number: int | None
    file_name: str | None
    path: str | None
    status: str
    verified: bool | None
    scan_width: int
    scan_height: int
    expected_frames: int
    frames_written: int
    complete_frames: int
    completeness: float
    events: int
    electrons_per_frame: float
    thresholds: tuple[float | None, float | None]
    started_at: datetime | None
    ended_at: datetime | None
    written_at: datetime | None
    sha256: str | None
    error: str | None
    dark: str | None
    dark_reference: str | None
    microscope_file: str | None
    microscope_metadata: dict
    microscope_reason: str | None
    recorded_at: datetime
    notes: tuple[NoteView, ...] = ()
    analyses: tuple[AnalysisView, ...] = ()

    @property
    def shape(self) -> str:
        """WIDTHxHEIGHT."""
        return f"{self.scan_width}x{self.scan_height}"


def finite(value: float | None) -> float | None:
    """A float the database can store (NaN and infinities become None)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def stop_record_files(directory: Path) -> list[Path]:
    """Every scan stop record under a directory (JSON files with a stop record's keys)."""
    found = []
    for path in sorted(Path(directory).rglob("*.json")):
        if path.name.startswith(".") or ".stemstream" in path.parts:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and {"scan_number", "status", "expected_frames"} <= data.keys():
            found.append(path)
    return found
