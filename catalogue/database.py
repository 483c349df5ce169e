"""Connecting to the catalogue's database and bringing its schema up to date with the Alembic migrations
shipped in this package (run programmatically: no alembic.ini, no ``create_all``).

Every database failure a person can meet comes out as a typed error with one readable line: the database
cannot be reached (CatalogueUnavailable, transient), there is no catalogue yet (CatalogueMissing).
Passwords never appear in messages (safe_url)."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.engine import make_url

from counting.errors import PermanentError, StemstreamError, TransientError

MIGRATIONS = Path(__file__).with_name("migrations")


class CatalogueError(StemstreamError):
    """A catalogue failure (never raised itself: its subclasses pick transient or permanent)."""


class CatalogueUnavailable(TransientError, CatalogueError):
    """The database cannot be reached or refused the connection."""


class CatalogueMissing(PermanentError, CatalogueError, FileNotFoundError):
    """There is no catalogue where the settings say (no session has recorded a scan there)."""


class CatalogueUrlError(PermanentError, CatalogueError, ValueError):
    """catalogue.url is not a database URL."""


class ScanNotFound(PermanentError, CatalogueError, LookupError):
    """No scan has that id or file name."""


class AmbiguousScan(PermanentError, CatalogueError, LookupError):
    """More than one scan matches the id given."""


def safe_url(url: str) -> str:
    """The URL for messages and logs: the password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return "<a malformed database URL>"


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the driver stemstream installs)."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise CatalogueUrlError(f"catalogue.url is not a database URL: {safe_url(url)}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases or in-memory SQLite)."""
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def make_engine(url: str, connect_timeout: float = 5.0) -> Engine:
    """An engine for the catalogue URL, with bounded connection waits."""
    url = normalise_url(url)
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        engine = create_engine(url, connect_args={"timeout": max(connect_timeout, 1.0)})

        @event.listens_for(engine, "connect")
        def _foreign_keys(dbapi_connection, _record) -> None:  # SQLite enforces them only when asked
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    args = {"connect_timeout": max(1, math.ceil(connect_timeout))} if backend == "postgresql" else {}
    return create_engine(url, connect_args=args, pool_pre_ping=True, pool_size=2, max_overflow=2)


def alembic_config() -> Config:
    """The Alembic configuration of the shipped migrations."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    """The newest migration shipped."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    """The schema revision of the database (None: no schema yet)."""
    with unavailable(engine), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


_MIGRATING = threading.Lock()  # Alembic's op/context proxies are process-global: one migration at a time
_PG_LOCK = 0x57E4CA7  # the advisory lock that serialises migrations between processes on PostgreSQL


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (creating it in an empty database); one process and one
    thread at a time."""
    head = head_revision()
    if current_revision(engine) == head:
        return
    config = alembic_config()
    with _MIGRATING, unavailable(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"SELECT pg_advisory_xact_lock({_PG_LOCK})"))
        if MigrationContext.configure(conn).get_current_revision() == head:  # another did it meanwhile
            return
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


@contextlib.contextmanager
def unavailable(engine: Engine) -> Iterator[None]:
    """Turn a connection failure into CatalogueUnavailable, naming the database (no password)."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as err:
        reason = str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err).splitlines()[0]
        where = safe_url(engine.url.render_as_string(hide_password=False))
        raise CatalogueUnavailable(f"catalogue {where} is unreachable: {reason}") from None
