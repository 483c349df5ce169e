"""The catalogue settings section; composed into the one Settings object in flows/settings.py."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr

SQLITE_NAME = "catalogue.sqlite"


class CatalogueSettings(BaseModel):
    """Where the scan catalogue lives and how long a session waits for it."""

    url: SecretStr | None = Field(
        None,
        description="SQLAlchemy URL of the catalogue, e.g. postgresql+psycopg://stem@db.example.org/stemstream "
        "(a password is better kept in ~/.pgpass or PGPASSWORD); none: SQLite at <output_dir>/catalogue.sqlite",
    )
    enabled: bool = Field(True, description="record sessions, scans, darks and analyses in the catalogue")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to wait for the database server")
    flush_timeout: float = Field(
        20.0,
        ge=0,
        description="seconds a session's end waits for scans not yet recorded (the database was down); "
        "what is still not recorded then is kept in the session directory for `stemstream scans rebuild`",
    )


def catalogue_url(settings: CatalogueSettings, output_dir: Path) -> str:
    """The database URL: the setting, else SQLite in the output directory."""
    if settings.url is not None and settings.url.get_secret_value().strip():
        return settings.url.get_secret_value().strip()
    return f"sqlite:///{(Path(output_dir).expanduser() / SQLITE_NAME).resolve()}"
