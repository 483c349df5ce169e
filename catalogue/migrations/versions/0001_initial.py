"""The first catalogue schema: sessions, darks, scans, notes, analyses.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(100), nullable=False, unique=True),
        sa.Column("session_number", sa.Integer),
        sa.Column("camera", sa.String(20)),
        sa.Column("backend", sa.String(20)),
        sa.Column("scans_dir", sa.Text),
        sa.Column("started_at", sa.DateTime, index=True),
        sa.Column("ended_at", sa.DateTime),
        sa.Column("state", sa.String(20)),
        sa.Column("message", sa.Text),
    )
    op.create_table(
        "darks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("path", sa.Text, nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime, index=True),
        sa.Column("frames", sa.Integer),
        sa.Column("mean", sa.Float),
        sa.Column("noise", sa.Float),
        sa.Column("hot_pixels", sa.Integer),
        sa.Column("sha256", sa.String(64)),
        sa.Column("source", sa.String(40)),
        sa.Column("stats", Json, nullable=False),
    )
    op.create_table(
        "scans",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("uid", sa.String(32), nullable=False, unique=True),
        sa.Column("scan_id", sa.Integer, nullable=False, index=True),
        sa.Column("scan_number", sa.Integer, nullable=False, index=True),
        sa.Column("session_id", sa.Integer, sa.ForeignKey("sessions.id"), index=True),
        sa.Column("file_name", sa.String(255), index=True),
        sa.Column("path", sa.Text),
        sa.Column("status", sa.String(20), nullable=False, index=True),
        sa.Column("verified", sa.Boolean),
        sa.Column("scan_width", sa.Integer, nullable=False),
        sa.Column("scan_height", sa.Integer, nullable=False),
        sa.Column("expected_frames", sa.Integer, nullable=False),
        sa.Column("frames_written", sa.Integer, nullable=False),
        sa.Column("complete_frames", sa.Integer, nullable=False),
        sa.Column("completeness", sa.Float, nullable=False),
        sa.Column("events", sa.BigInteger, nullable=False),
        sa.Column("electrons_per_frame", sa.Float, nullable=False),
        sa.Column("background_threshold", sa.Float),
        sa.Column("xray_threshold", sa.Float),
        sa.Column("started_at", sa.DateTime, index=True),
        sa.Column("ended_at", sa.DateTime),
        sa.Column("written_at", sa.DateTime),
        sa.Column("sha256", sa.String(64)),
        sa.Column("error", sa.Text),
        sa.Column("dark_id", sa.Integer, sa.ForeignKey("darks.id")),
        sa.Column("dark_reference", sa.Text),
        sa.Column("microscope_file", sa.Text),
        sa.Column("microscope_metadata", Json, nullable=False),
        sa.Column("microscope_reason", sa.Text),
        sa.Column("record", Json, nullable=False),
        sa.Column("recorded_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "notes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "scan_id", sa.Integer, sa.ForeignKey("scans.id", ondelete="CASCADE"), nullable=False, index=True
        ),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("author", sa.String(100)),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "analyses",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "scan_id", sa.Integer, sa.ForeignKey("scans.id", ondelete="CASCADE"), nullable=False, index=True
        ),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("params", Json, nullable=False),
        sa.Column("results", Json, nullable=False),
        sa.Column("images", Json, nullable=False),
        sa.Column("calibrated", sa.Boolean),
        sa.Column("error", sa.Text),
    )


def downgrade() -> None:
    for table in ("analyses", "notes", "scans", "darks", "sessions"):
        op.drop_table(table)
