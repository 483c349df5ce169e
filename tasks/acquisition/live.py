"""The live page of a local session: its address, as the view process printed it (logs/view.log), and\nlinks to a scan on it."""

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


def live_link(url: str | None, path: str) -> dict:
    """A summary-table cell linking to the scan on the live page (by its file name); empty without a page."""
    if not url or not path:
        return {"live view": ""}
    return {"live view": f"{url.split('#')[0]}#file={Path(path).name}"}
