"""The catalogue's tables (SQLAlchemy 2 ORM): sessions, scans, darks, notes and analyses.

The schema is made and changed only by the Alembic migrations in ``catalogue/migrations`` (never
``create_all``); a change here needs a new migration beside them. Times are UTC (naive datetimes).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

Json = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    """The catalogue's declarative base."""


class SessionRow(Base):
    """A session: one run of the session flow (a flow run), its scans directory and how it ended."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(100), unique=True)  # the flow run id (the session directory)
    session_number: Mapped[int | None] = mapped_column(Integer)  # streaming.session_id of its processes
    camera: Mapped[str | None] = mapped_column(String(20))
    backend: Mapped[str | None] = mapped_column(String(20))
    scans_dir: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    state: Mapped[str | None] = mapped_column(String(20))
    message: Mapped[str | None] = mapped_column(Text)

    scans: Mapped[list[ScanRow]] = relationship(back_populates="session")


class DarkRow(Base):
    """A dark reference (.npy) and its statistics."""

    __tablename__ = "darks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    frames: Mapped[int | None] = mapped_column(Integer)
    mean: Mapped[float | None] = mapped_column(Float)
    noise: Mapped[float | None] = mapped_column(Float)
    hot_pixels: Mapped[int | None] = mapped_column(Integer)
    sha256: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(40))  # instrument, simulated, file
    stats: Mapped[dict] = mapped_column(Json, default=dict)


class ScanRow(Base):
    """A written (or failed) scan, from its stop record, with what the session learned about it."""

    __tablename__ = "scans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(32), unique=True)  # the scan's uuid (stop record, HDF5)
    scan_id: Mapped[int] = mapped_column(Integer, index=True)  # unique in its scans directory
    scan_number: Mapped[int] = mapped_column(Integer, index=True)  # the detector's; repeats
    session_id: Mapped[int | None] = mapped_column(ForeignKey("sessions.id"), index=True)
    file_name: Mapped[str | None] = mapped_column(String(255), index=True)
    path: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), index=True)  # complete, incomplete, failed
    verified: Mapped[bool | None] = mapped_column(Boolean)
    scan_width: Mapped[int] = mapped_column(Integer)
    scan_height: Mapped[int] = mapped_column(Integer)
    expected_frames: Mapped[int] = mapped_column(Integer)
    frames_written: Mapped[int] = mapped_column(Integer)
    complete_frames: Mapped[int] = mapped_column(Integer)
    completeness: Mapped[float] = mapped_column(Float)
    events: Mapped[int] = mapped_column(BigInteger)
    electrons_per_frame: Mapped[float] = mapped_column(Float)  # counted dose
    background_threshold: Mapped[float | None] = mapped_column(Float)
    xray_threshold: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)  # first data
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)  # last data
    written_at: Mapped[datetime | None] = mapped_column(DateTime)
    sha256: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    dark_id: Mapped[int | None] = mapped_column(ForeignKey("darks.id"))
    dark_reference: Mapped[str | None] = mapped_column(Text)  # as the file says (digest, or "none")
    microscope_file: Mapped[str | None] = mapped_column(Text)
    microscope_metadata: Mapped[dict] = mapped_column(Json, default=dict)
    microscope_reason: Mapped[str | None] = mapped_column(Text)  # why there is none
    record: Mapped[dict] = mapped_column(Json, default=dict)  # the whole stop record
    recorded_at: Mapped[datetime] = mapped_column(DateTime)

    session: Mapped[SessionRow | None] = relationship(back_populates="scans")
    dark: Mapped[DarkRow | None] = relationship()
    notes: Mapped[list[NoteRow]] = relationship(back_populates="scan", order_by="NoteRow.id")
    analyses: Mapped[list[AnalysisRow]] = relationship(back_populates="scan", order_by="AnalysisRow.id")


class NoteRow(Base):
    """A person's note on a scan."""

    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    author: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime)

    scan: Mapped[ScanRow] = relationship(back_populates="notes")


class AnalysisRow(Base):
    """One analysis of a scan: its parameters, results and images; several per scan."""

    __tablename__ = "analyses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    kind: Mapped[str] = mapped_column(String(40))  # session (during acquisition) or reanalysis
    params: Mapped[dict] = mapped_column(Json, default=dict)
    results: Mapped[dict] = mapped_column(Json, default=dict)
    images: Mapped[dict] = mapped_column(Json, default=dict)  # name -> PNG path
    calibrated: Mapped[bool | None] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)
    uid: Mapped[str | None] = mapped_column(String(32), unique=True, index=True)  # replays add it once

    scan: Mapped[ScanRow] = relationship(back_populates="analyses")
