"""Stored text (catalogue notes, paths, metadata, errors) for the terminal: never read as rich markup, and
without control characters (no ESC sequence from a note reaches the terminal)."""

from __future__ import annotations

import re

from rich.text import Text

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline, DEL, C1


def plain(value: object) -> Text:
    """``value`` as literal terminal text: ``[/]`` prints as itself, control characters are dropped."""
    return Text(_CONTROL.sub("", str(value)))
