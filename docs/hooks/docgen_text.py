"""Markdown helpers shared by the generated reference pages."""

from __future__ import annotations


def cell(text: object) -> str:
    """Text made safe for one Markdown table cell: one line, no raw HTML, no column breaks."""
    value = " ".join(str(text).split())
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return value.replace("|", "\\|").replace("*", "\\*") or "—"


def code(text: object) -> str:
    """Inline code in a table cell (backticks doubled when the text has one)."""
    value = " ".join(str(text).split()).replace("|", "\\|")
    if not value:
        return "—"
    fence = "``" if "`" in value else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table (cells already escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


GENERATED_NOTE = (
    '!!! note "Generated"\n    This page is generated from the code when the site is built '
    "(`{source}`, by `docs/hooks/{hook}`); edit the code, not this page.\n"
)
