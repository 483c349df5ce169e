"""Fixtures for the catalogue tests: a real PostgreSQL server for the whole pytest session (Debian's
postgresql on loopback, stopped at the end), and a catalogue URL per test on SQLite and on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stemstream_testing.postgres import PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server on loopback for every catalogue test; stopped and removed at the end."""
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty catalogue database: a SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalogue.sqlite'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    if not server.running:  # a test that stopped it failed before bringing it back
        server.restart()
    return server.create_database(f"cat_{uuid.uuid4().hex[:12]}")
