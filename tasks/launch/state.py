"""A session's state file: what the session started and where, saved after every change.

Three readers rely on its JSON keys: the session's cleanup hook after a crash or a cancellation (job id,
aggregator and page PIDs, process tokens), the terminal's watcher (``ready``, ``receivers``, ``scans_dir``,
``live_url``) and a catalogue rebuild (``flow_run``, ``backend``, ``settings_file``, ``scans_dir``). A
field that is not known yet (None) is left out of the file, as it was before it was typed:
``"aggregator_pid" not in`` the file means the aggregator was never armed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from catalogue.session_file import SESSION_FILE, session_file

__all__ = ["SESSION_FILE", "SessionState", "session_file"]


@dataclass
class SessionState:
    """What one session has started (and so what cleanup must stop), and where its files are."""

    session_dir: Path  # where the file lives; not saved in it
    flow_run: str = ""  # the flow run id (the session directory's name)
    backend: str = ""  # "local" or "nersc": which backends started what follows
    settings_file: str = ""  # the session's settings, as its processes read them
    scans_dir: str = ""  # where the scan writer puts the files
    job_id: str | None = None  # the node streamers' job (a Slurm job id, or local-PID-SESSION)
    aggregator: str | None = None  # the aggregator backend's class name, once armed
    aggregator_pid: int | None = None
    aggregator_token: str | None = None  # in the remote aggregator's environment: stop checks it is ours
    view_pid: int | None = None  # the live page beside a remote aggregator (same token)
    live_url: str | None = None  # that page's address, without its token
    local_pids: list[int] = field(default_factory=list)  # local node streamer processes
    process_tokens: list[str] = field(default_factory=list)  # in every local process's environment
    ready: bool = False  # every node streamer reported ready: scans may start
    receivers: list[str] = field(default_factory=list)  # where the camera sends, once ready
    ends_in: float | None = None  # an instrument session: seconds left when it became ready

    @property
    def path(self) -> Path:
        """The state file."""
        return session_file(self.session_dir)

    @classmethod
    def load(cls, session_dir: Path) -> SessionState:
        """The state saved in session_dir; an empty one (nothing started) when there is no file yet.
        Raises OSError or ValueError for a file that cannot be read; unknown keys are ignored."""
        path = session_file(session_dir)
        if not path.exists():
            return cls(Path(session_dir))
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a session state (a JSON object)")
        known = {f.name for f in fields(cls)} - {"session_dir"}
        return cls(Path(session_dir), **{k: v for k, v in data.items() if k in known})

    def to_json(self) -> dict[str, object]:
        """The file's content: every known field, None values left out."""
        data = asdict(self)
        del data["session_dir"]
        return {k: v for k, v in data.items() if v is not None}

    def save(self) -> None:
        """Write the file atomically (a reader never sees half of it)."""
        self.session_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str))
        tmp.replace(self.path)

    def add_tokens(self, *tokens: str) -> None:
        """Remember the process tokens of local processes just started (each once)."""
        self.process_tokens += [t for t in tokens if t not in self.process_tokens]
