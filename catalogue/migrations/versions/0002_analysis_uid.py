"""An analysis's own uid, so that replaying a pending file never adds an analysis twice.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("analyses", sa.Column("uid", sa.String(32), nullable=True))
    op.create_index("ix_analyses_uid", "analyses", ["uid"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_analyses_uid", table_name="analyses")
    with op.batch_alter_table("analyses") as batch:
        batch.drop_column("uid")
