"""What can go wrong with a session's processes, on the project's two branches (counting/errors.py)."""

from __future__ import annotations

from counting.errors import PermanentError


class NodeFailure(PermanentError, RuntimeError):
    """A node streamer (or its job) stopped while the session needed it.

    lost: names of the node streamers that stopped (empty: the whole job). writer_alive: the node hosting
    the scan writer still runs, so the scan in flight can still be written (by the writer's deadline) with
    the lost node's frames marked missing; decided by whoever knows the writer's host (the aggregator's
    monitor says it).
    """

    def __init__(self, message: str, lost: list[str] | None = None, writer_alive: bool = False) -> None:
        super().__init__(message)
        self.lost = lost or []
        self.writer_alive = writer_alive


class AggregatorExited(PermanentError, RuntimeError):
    """The session's aggregator stopped while the session needed it."""


class ReleaseError(PermanentError, RuntimeError):
    """The aggregator or the nodes could not be released (every failure is named in the message)."""


class SessionFailed(PermanentError, RuntimeError):
    """A session ended without what it was run for (scans failed verification, no session directory)."""
