"""The scan catalogue: every session, scan, dark reference, note and analysis in a database (SQLite in the
output directory by default, PostgreSQL by URL), through SQLAlchemy with Alembic migrations.

Plain code (no Prefect): the session flow records into it through :class:`Recorder` (in the background,
never holding up the data path, keeping what it could not record), the CLI reads and annotates it, and
``stemstream scans rebuild`` fills it from the stop records. Layer: below tasks, above streaming.

The API other code uses is :class:`Catalogue` (record_session, end_session, record_scan, record_dark,
link_metadata, record_analysis, add_note, find_scan, search, darks, newest_dark) with the typed entries of
``catalogue.entries``; :func:`open_catalogue` opens the one the settings name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from counting.lazy import lazy_exports

# Names resolve on first use, so that importing catalogue.settings (the settings object does, in every
# process) loads neither SQLAlchemy nor Alembic.
_WHERE = {
    "AmbiguousScan": "catalogue.database",
    "CatalogueError": "catalogue.database",
    "CatalogueMissing": "catalogue.database",
    "CatalogueUnavailable": "catalogue.database",
    "ScanNotFound": "catalogue.database",
    "AnalysisView": "catalogue.entries",
    "DarkEntry": "catalogue.entries",
    "DarkView": "catalogue.entries",
    "NoteView": "catalogue.entries",
    "ScanEntry": "catalogue.entries",
    "ScanQuery": "catalogue.entries",
    "ScanView": "catalogue.entries",
    "SessionEntry": "catalogue.entries",
    "CatalogueSettings": "catalogue.settings",
    "catalogue_url": "catalogue.settings",
    "Catalogue": "catalogue.store",
}
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

if TYPE_CHECKING:
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


__getattr__ = lazy_exports(__name__, _WHERE)


def open_catalogue(settings: CatalogueSettings, output_dir: Any, *, create: bool = True) -> Catalogue:
    """The catalogue the settings name (``catalogue.url``, else SQLite in ``output_dir``)."""
    from catalogue.settings import catalogue_url
    from catalogue.store import Catalogue

    return Catalogue.open(
        catalogue_url(settings, output_dir), create=create, connect_timeout=settings.connect_timeout
    )
