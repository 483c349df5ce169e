"""Fill the catalogue from what is on disk: the sessions' state files, the entries a session could not
record (pending files), and every scan's stop record. Idempotent: scans are upserted by uid, an analysis
with a uid (every one the recorder queues) is skipped when the catalogue has it already, so a replay that
failed half-way can simply be run again, and a pending file, once replayed, is renamed."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from catalogue.entries import ScanEntry, SessionEntry, stop_record_files, utc
from catalogue.journal import mark_replayed, read_pending
from catalogue.recorder import PENDING_NAME, apply_entry
from catalogue.session_file import SESSION_FILE
from catalogue.store import Catalogue

log = logging.getLogger(__name__)


@dataclass
class RebuildReport:
    """What a rebuild found and recorded."""

    scans: int = 0
    new_scans: int = 0
    sessions: int = 0
    pending_entries: int = 0
    unreadable: list[str] = field(default_factory=list)


def rebuild(catalogue: Catalogue, directory: Path) -> RebuildReport:
    """Record every session, pending entry and stop record found under ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    report = RebuildReport()
    sessions = _sessions(directory, report)
    for entry in sessions.values():
        catalogue.record_session(entry)
    report.sessions = len({e.key for e in sessions.values()})
    stem = Path(PENDING_NAME).stem
    for pending in sorted(directory.rglob(f"{stem}*.json")):
        if pending.name.startswith(".") or ".recorded" in pending.name:
            continue
        try:
            ops = read_pending(pending)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            report.unreadable.append(f"{pending}: {exc}")
            continue
        for kind, data in ops:
            apply_entry(catalogue, kind, data)
        report.pending_entries += len(ops)
        mark_replayed(pending)
    known = catalogue.scan_uids()
    for path in stop_record_files(directory):
        try:
            entry = ScanEntry.from_stop_record(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            report.unreadable.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        session = sessions.get(str(path.parent.resolve()))
        beside = path.with_suffix(".h5")
        if (
            entry.record.path and beside.is_file()
        ):  # where the file is now (a moved directory, a relative path)
            entry.record.path = str(beside.resolve())
        entry = ScanEntry(
            entry.record, session_key=session.key if session else None, record_file=entry.record_file
        )
        catalogue.record_scan(entry)
        report.scans += 1
        report.new_scans += entry.uid not in known
    return report


def _sessions(directory: Path, report: RebuildReport) -> dict[str, SessionEntry]:
    """Sessions by their scans directory (resolved), from the session state files under ``directory``."""
    found: dict[str, SessionEntry] = {}
    for state_file in sorted(directory.rglob(SESSION_FILE)):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            report.unreadable.append(f"{state_file}: {exc}")
            continue
        if not isinstance(state, dict) or "scans_dir" not in state:
            continue
        number = None
        try:
            settings = json.loads(Path(state.get("settings_file", "")).read_text())
            number = int(settings["streaming"]["session_id"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        scans = Path(state["scans_dir"])
        entry = SessionEntry(
            key=str(state.get("flow_run") or state_file.parent.name),
            session_number=number,
            backend=state.get("backend"),
            scans_dir=str(scans),
            started_at=utc(state_file.parent.stat().st_ctime),
        )
        found[str(scans.resolve())] = entry
    return found
