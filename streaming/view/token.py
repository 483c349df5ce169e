"""The live page's token: where the view finds it (live.token, or its token file) and how a token file is
written (mode 0600 from creation). Light: the session imports it to hand its view a configured token."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from streaming.settings import LiveSettings

TOKEN_FILE = "live-token"  # a session's token file, in its session directory


def page_token(live: LiveSettings) -> tuple[str, bool]:
    """The page's token and whether it is live.token as configured: live.token, else the one in
    live.token_file, else a random one (then written to live.token_file when given, for its user to read)."""
    if live.token is not None:
        return live.token.get_secret_value(), True
    found = ""
    if live.token_file is not None and live.token_file.is_file():
        found = live.token_file.read_text().strip()
    if found:
        return found, False
    token = secrets.token_urlsafe(18)
    if live.token_file is not None:
        write_token(live.token_file, token)
    return token, False


def write_token(path: Path, token: str) -> Path:
    """Write a token to ``path``, readable by its owner only (0600 from creation, replacing any old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return path
