"""The name of a session's state file, in one place.

The session flow writes it in its session directory (tasks.launch.state.SessionState); a catalogue rebuild
reads it to find the sessions on disk. It lives here, below tasks, so that both layers can name it.
"""

from __future__ import annotations

from pathlib import Path

SESSION_FILE = "session.json"


def session_file(session_dir: Path) -> Path:
    """The state file of the session whose directory this is."""
    return Path(session_dir) / SESSION_FILE
