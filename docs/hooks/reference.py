"""MkDocs hook: the generated reference pages (CLI, settings, messages) and the facility guide's nav.

The reference pages are made from the code at every build (never committed, so they cannot drift); the
facility guide lists the pages that exist under docs/facility/ (other pages may join it later).
"""

from __future__ import annotations

import logging
from pathlib import Path

import docgen_cli
import docgen_protocol
import docgen_settings
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.reference")

GENERATED = {
    "reference/cli.md": docgen_cli.render,
    "reference/settings.md": docgen_settings.render,
    "reference/messages.md": docgen_protocol.render,
}
FACILITY_TITLE = "Facility guide"
# The deployment guide's reading order; pages not named here follow in name order.
FACILITY_ORDER = ["index", "aggregator-host", "keys", "nersc", "prefect", "metrics", "alerts", "upgrading"]


def on_config(config, **kwargs):
    """Fill the facility guide's nav section with the pages that exist under docs/facility/."""
    pages = _facility_pages(Path(config["docs_dir"]) / "facility")
    nav = []
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and FACILITY_TITLE in entry:
            if not pages:  # no facility page yet: no empty section
                continue
            entry = {FACILITY_TITLE: pages}
        nav.append(entry)
    config["nav"] = nav
    return config


def _facility_pages(folder: Path) -> list[str]:
    names = sorted(p.stem for p in folder.glob("*.md")) if folder.is_dir() else []
    ranked = sorted(names, key=lambda n: (FACILITY_ORDER.index(n) if n in FACILITY_ORDER else 99, n))
    return [f"facility/{name}.md" for name in ranked]


def on_files(files, config, **kwargs):
    """Add the generated reference pages to the site."""
    for uri, render in GENERATED.items():
        files.append(File.generated(config, uri, content=render()))
    return files
