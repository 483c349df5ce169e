"""The live page of a local session: its address, as the view process printed it (logs/view.log)."""

from __future__ import annotations

from pathlib import Path


def live_url(session_dir: Path) -> str | None:
    """The page's URL once `stemstream view` printed ``live: <URL>`` in the session's logs, else None."""
    try:
        text = (Path(session_dir) / "logs" / "view.log").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("live: "):
            return line.removeprefix("live: ").strip()
    return None
