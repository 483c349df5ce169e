"""Alembic environment of the catalogue: run programmatically by catalogue.database.upgrade, on the
connection it hands over in ``config.attributes["connection"]`` (never from an alembic.ini URL)."""

from __future__ import annotations

from alembic import context

from catalogue.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
