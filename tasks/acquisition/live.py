"""The live page of a session: its address, as a local view process printed it (logs/view.log) or as the
session's state records a remote one (the NERSC backend's, on the aggregator host), and links to a scan on
it. Neither carries the page's token (links go into Prefect artifacts); only the user's own terminal is
given it, from the session's 0600 token file."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from streaming.view.token import TOKEN_FILE
from tasks.launch.state import SessionState


def live_url(session_dir: Path, with_token: bool = False) -> str | None:
    """The page's URL once `stemstream view` printed ``live: <URL>`` (in the session's logs, or on the
    aggregator host: the state records it), else None; without a token, unless ``with_token`` (for the
    user's terminal) and the session has its token file."""
    url = _logged_url(Path(session_dir)) or _recorded_url(Path(session_dir))
    if url is None:
        return None
    url = without_token(url)
    token = _token(Path(session_dir) / TOKEN_FILE) if with_token else ""
    return f"{url}?token={quote(token)}" if token else url


def _logged_url(session_dir: Path) -> str | None:
    """A local page's address, from its ``live:`` line in logs/view.log."""
    try:
        text = (session_dir / "logs" / "view.log").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("live: "):
            return line.removeprefix("live: ").strip()
    return None


def _recorded_url(session_dir: Path) -> str | None:
    """A remote page's address (NERSC backend: on the aggregator host), as the session's state records it."""
    try:
        return SessionState.load(session_dir).live_url
    except (OSError, ValueError, TypeError):
        return None


def live_link(url: str | None, path: str) -> dict:
    """A summary-table cell linking to the scan on the live page (by its file name), without the page's
    token; empty without a page."""
    if not url or not path:
        return {"live view": ""}
    return {"live view": f"{without_token(url.split('#')[0])}#file={Path(path).name}"}


def without_token(url: str) -> str:
    """The URL with any ``token`` query parameter removed."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
