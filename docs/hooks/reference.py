"""MkDocs hook: the generated reference pages (CLI, settings, messages) and the facility guide's nav.

The reference pages are made from the code at every build (never committed, so they cannot drift); the
facility guide lists the pages that exist under docs/facility/ (other pages may join it later).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import docgen_cli
import docgen_protocol
import docgen_settings
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.reference")
_CODE_SPAN = re.compile(r"`[^`]*`")

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


def on_page_markdown(markdown, page, config, files, **kwargs):
    """Pipes in code spans of table rows: GitHub needs them escaped (``\\|``), Python-Markdown does not (it
    would show the backslash), so the pages keep GitHub's spelling and the site gets plain pipes."""
    lines = markdown.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("|") and "\\|" in line:
            lines[i] = _CODE_SPAN.sub(lambda m: m.group(0).replace("\\|", "|"), line)
    return "\n".join(lines)
