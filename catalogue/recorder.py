"""Recording into the catalogue in the background, so that nothing in the data path waits on a database,
and a database that is down loses nothing.

A Recorder takes entries (sessions, scans, analyses) at once and returns; one thread writes them in order.
When the database cannot be reached it logs one warning, keeps everything, and tries again at the next
entry (and every ``retry_every`` seconds); the outage's end is logged with what was caught up. ``close``
tries once more for at most its timeout. Every entry is journalled to a pending file
(``catalogue-pending.json`` in the session directory, catalogue.journal) as it is handed in, so what is not
recorded, after a crash too, is there for ``stemstream scans rebuild`` to replay; an entry the database
refuses for another reason is kept there too. A clean close renames a file whose entries were all
recorded to ``*.recorded.json``. The stop records beside the scan files hold every scan anyway.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from catalogue.database import CatalogueError, CatalogueUnavailable
from catalogue.entries import ScanEntry, SessionEntry
from catalogue.journal import PendingJournal, read_pending
from catalogue.store import Catalogue

__all__ = ["PENDING_NAME", "Recorder", "RecorderReport", "apply_entry", "read_pending"]

PENDING_NAME = "catalogue-pending.json"
Logger = logging.Logger | logging.LoggerAdapter


@dataclass(frozen=True)
class RecorderReport:
    """What a recorder did: entries recorded, still pending (kept in ``pending_file``), the last error."""

    recorded: int
    pending: int
    pending_file: str | None
    error: str | None


class Recorder:
    """Writes catalogue entries from a background thread, in order, keeping them while the database is down."""

    def __init__(
        self,
        connect: Callable[[], Catalogue],
        pending_file: Path | None,
        log: Logger | None = None,
        retry_every: float = 10.0,
    ) -> None:
        self._connect = connect
        self.pending_file = pending_file
        self.log = log or logging.getLogger(__name__)
        self.retry_every = retry_every
        self._ops: list[tuple[int, str, dict]] = []  # (seq in the journal, kind, data)
        self._failed: list[tuple[int, str, dict]] = []  # refused for another reason than an outage: kept
        self._journal = PendingJournal(pending_file) if pending_file is not None else None
        self._unjournalled: set[int] = set()  # entries the journal could not take (tried again at close)
        self._seq = 0
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = False  # close's timeout is over: the thread ends after its current call
        self._fresh = False  # a new entry arrived: try now, even while the database is down
        self._catalogue: Catalogue | None = None
        self._recorded = 0
        self._error: str | None = None
        self._down_since: float | None = None
        self._uids: dict[str, str] = {}  # scan path -> uid, for analyses named by their scan's path
        self._thread = threading.Thread(target=self._run, name="catalogue-recorder", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------- what callers hand in
    def session(self, entry: SessionEntry) -> None:
        """Record a session (never waits)."""
        self._put("session", _session_json(entry))

    def scan(self, entry: ScanEntry) -> None:
        """Record a scan (never waits)."""
        if entry.record.path:
            self._uids[entry.record.path] = entry.uid
        self._put("scan", entry.to_json())

    def analysis(self, scan: str, params: dict, results: dict, **extra: Any) -> None:
        """Record an analysis of a scan (uid or path; never waits); ``extra``: record_analysis's options."""
        data = {"scan": self._uids.get(scan, scan), "params": params, "results": results, **extra}
        data.setdefault("uid", uuid.uuid4().hex)  # stored with it: a replay never adds it twice
        self._put("analysis", data)

    def end_session(self, key: str, state: str, message: str = "") -> None:
        """Record how the session ended (never waits)."""
        self._put("end", {"key": key, "state": state, "message": message})

    def close(self, timeout: float = 20.0) -> RecorderReport:
        """Record what is left within ``timeout`` seconds, stop the thread, and keep what could not be
        recorded in the pending file."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            left = sorted(self._ops + self._failed)
            self._ops.clear()
        if self._thread.is_alive():  # still inside a database call: it ends by itself (daemon), bounded
            self.log.warning("catalogue: still busy after %g s; the rest is kept for later", timeout)
        written = self._keep(left)
        if self._catalogue is not None and not self._thread.is_alive():
            self._catalogue.close()
        return RecorderReport(self._recorded, len(left), written, self._error)

    # ------------------------------------------------------------------------------------------ thread
    def _put(self, kind: str, data: dict) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("the catalogue recorder is closed")
            self._seq += 1
            self._journal_entry(self._seq, kind, data)
            self._ops.append((self._seq, kind, data))
            self._fresh = True
            self._cond.notify_all()

    def _journal_entry(self, seq: int, kind: str, data: dict) -> None:
        """Append the entry to the pending file (durable before the caller goes on); a journal that
        cannot be written is logged, and the entry kept in memory and tried there again at close."""
        if self._journal is None:
            return
        try:
            self._journal.append(seq, kind, data)
            self._unjournalled.discard(seq)
        except OSError as exc:
            if not self._unjournalled:
                self.log.error("catalogue: cannot write the pending file %s: %s", self._journal.wanted, exc)
            self._unjournalled.add(seq)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closing and (not self._ops or self._stopped):
                    return
                if not self._ops:
                    self._cond.wait()  # until there is something to record, or close
                    continue
                if self._down_since is not None and not self._fresh:  # down: at the next entry, or later
                    self._cond.wait(0.5 if self._closing else self.retry_every)
                    if self._stopped:
                        return
                self._fresh = False
            self._drain()

    def _drain(self) -> None:
        """Write the entries in order; stop at the first one the database cannot take now."""
        while True:
            with self._cond:
                if not self._ops or self._stopped:
                    return
                op = self._ops[0]
            failed = False
            try:
                self._apply(op[1], op[2])
            except CatalogueUnavailable as exc:
                self._unavailable(str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - a bug or a refused entry: keep it, never stop recording
                self._error, failed = f"{type(exc).__name__}: {exc}", True
                self.log.error("catalogue: could not record a %s (%s); kept as pending", op[1], self._error)
            else:
                self._recorded += 1
                if self._journal is not None:
                    self._journal.done(op[0])
            with self._cond:
                if self._ops and self._ops[0] is op:
                    self._ops.pop(0)
                    if failed:
                        self._failed.append(op)
            if self._down_since is not None:
                self.log.warning(
                    "catalogue reachable again after %.0f s: recording what was kept",
                    time.monotonic() - self._down_since,
                )
                self._down_since = None

    def _unavailable(self, message: str) -> None:
        self._error = message
        if self._catalogue is not None:
            self._catalogue.close()  # a fresh engine next time: the server may have restarted
            self._catalogue = None
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.log.warning(
                "%s; %d entr%s kept, recorded when it is back (the scans themselves are safe)",
                message,
                len(self._ops),
                "y" if len(self._ops) == 1 else "ies",
            )

    def _apply(self, kind: str, data: dict) -> None:
        if self._catalogue is None:
            try:
                self._catalogue = self._connect()
            except CatalogueError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. a migration that failed mid-way on a lost server
                raise CatalogueUnavailable(f"catalogue unavailable: {type(exc).__name__}: {exc}") from None
        apply_entry(self._catalogue, kind, data)

    def _keep(self, ops: list[tuple[int, str, dict]]) -> str | None:
        """What was not recorded stays in the journal (and whatever the journal missed is tried again);
        a journal whose entries were all recorded is renamed out of the way."""
        if self._journal is None:
            if ops:
                self.log.error("catalogue: %d entr(ies) not recorded (no pending file given)", len(ops))
            return None
        for seq, kind, data in ops:
            if seq in self._unjournalled:
                self._journal_entry(seq, kind, data)
        if not ops:
            self._journal.retire()
            return None
        self._journal.close()
        path = self._journal.path
        if self._unjournalled or path is None:
            self.log.error("catalogue: %d entr(ies) not recorded and not kept (%s)", len(ops), self._error)
            return None
        self.log.warning(
            "catalogue: %d entr%s not recorded (%s); kept in %s: run `stemstream scans rebuild %s` when the "
            "database is back",
            len(ops),
            "y" if len(ops) == 1 else "ies",
            self._error,
            path,
            path.parent,
        )
        return str(path)


def apply_entry(catalogue: Catalogue, kind: str, data: dict) -> None:
    """Write one recorder entry (also how the pending file is replayed)."""
    if kind == "session":
        started = data.get("started_at")
        catalogue.record_session(
            SessionEntry(**{**data, "started_at": datetime.fromisoformat(started) if started else None})
        )
    elif kind == "scan":
        catalogue.record_scan(ScanEntry.from_json(data))
    elif kind == "analysis":
        data = dict(data)
        catalogue.record_analysis(data.pop("scan"), data.pop("params"), data.pop("results"), **data)
    elif kind == "end":
        catalogue.end_session(data["key"], data["state"], data.get("message", ""))
    else:
        raise ValueError(f"unknown catalogue entry kind {kind!r}")


def _session_json(entry: SessionEntry) -> dict:
    data = asdict(entry)
    data["started_at"] = entry.started_at.isoformat() if entry.started_at else None
    return data
