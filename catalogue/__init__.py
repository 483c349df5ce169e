"""The scan catalogue: every session, scan, dark reference, note and analysis in a database (SQLite in the
output directory by default, PostgreSQL by URL), through SQLAlchemy with Alembic migrations.

Plain code (no Prefect): the session flow records into it through :class:`Recorder` (in the background,
never holding up the data path, keeping what it could not record), the CLI reads and annotates it, and
``stemstream scans rebuild`` fills it from the stop records. Layer: below tasks, above streaming.

The API other code uses is :class:`Catalogue` (record_session, end_session, record_scan, record_dark,
link_metadata, record_analysis, add_note, find_scan, search, darks, newest_dark) with the typed entries of
``catalogue.entries``; :func:`open_catalogue` opens the one the settings name.
"""

from catalogue.database import (
    AmbiguousScan,
    CatalogueError,
    CatalogueMissing,
    CatalogueUnavailable,
    ScanNotFound,
)
from catalogue.entries import (
    AnalysisView,
    DarkEntry,
    DarkView,
    NoteView,
    ScanEntry,
    ScanQuery,
    ScanView,
    SessionEntry,
)
from catalogue.settings import CatalogueSettings, catalogue_url
from catalogue.store import Catalogue

__all__ = [
    "AmbiguousScan",
    "AnalysisView",
    "Catalogue",
    "CatalogueError",
    "CatalogueMissing",
    "CatalogueSettings",
    "CatalogueUnavailable",
    "DarkEntry",
    "DarkView",
    "NoteView",
    "ScanEntry",
    "ScanNotFound",
    "ScanQuery",
    "ScanView",
    "SessionEntry",
    "catalogue_url",
    "open_catalogue",
]


def open_catalogue(settings: CatalogueSettings, output_dir, *, create: bool = True) -> Catalogue:
    """The catalogue the settings name (``catalogue.url``, else SQLite in ``output_dir``)."""
    return Catalogue.open(
        catalogue_url(settings, output_dir), create=create, connect_timeout=settings.connect_timeout
    )
