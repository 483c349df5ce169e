"""A stop record staged while its scan file is being replaced (the microscope metadata step), and how a
step that stopped midway is settled: whichever record matches the file's checksum stays.

The step stages the new record (``.<name>.json.pending``, fsynced) before the file takes its new content,
and renames it over the record after; a crash in between leaves the new file, the old record and the
staged one. ``resolve_pending_record`` (run by the step itself and by verification) then keeps the staged
record if the file has its checksum and drops it if the file still has the old record's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from counting.storage.durable import file_sha256, fsync_directory
from streaming.protocol.record import record_path

log = logging.getLogger(__name__)


def pending_record_path(h5_path: Path) -> Path:
    """Where the stop record for a file being replaced is staged until the file has its new content."""
    rec = record_path(h5_path)
    return rec.with_name(f".{rec.name}.pending")


def commit_pending_record(h5_path: Path) -> None:
    """The staged record becomes the stop record (rename, directory fsynced); OSError if it cannot."""
    rec = record_path(h5_path)
    os.replace(pending_record_path(h5_path), rec)
    fsync_directory(rec.parent)


def resolve_pending_record(h5_path: str | os.PathLike) -> bool:
    """Settle a record staged by a step that stopped midway (see the module docstring). True when one was
    settled either way; False when there was none, or neither record matches the file (left for
    verification to report)."""
    h5_path = Path(h5_path)
    pending, rec = pending_record_path(h5_path), record_path(h5_path)
    if not pending.is_file() or not h5_path.is_file():
        return False
    try:
        staged = json.loads(pending.read_text()).get("sha256")
        current = json.loads(rec.read_text()).get("sha256") if rec.is_file() else None
        digest = file_sha256(h5_path)
        if digest == staged:
            commit_pending_record(h5_path)
        elif digest == current:
            pending.unlink()
        else:
            return False
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s: staged stop record not settled (%s)", h5_path.name, exc)
        return False
    log.info("%s: stop record staged by an interrupted step settled", h5_path.name)
    return True
