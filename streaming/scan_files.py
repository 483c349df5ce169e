"""A finished scan onto disk: the HDF5 (atomically, never over an existing file) and its stop record.

Storage failures are reported, not raised: the record then says "failed" with the OS reason and the
caller decides (the scan writer stops its host: every later scan would fail the same way).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from counting.errors import PermanentError
from counting.sparse import CountedScan, counted_scan_image, write_file_atomically
from streaming.scan_record import ScanRecord, ScanStatus, record_path

log = logging.getLogger(__name__)


class ScanWriterError(PermanentError, RuntimeError):
    """The scan writer cannot store scans: its output directory is unusable or a scan failed to write."""


@dataclass(frozen=True)
class ScanNaming:
    """File names of a session's scans."""

    output_dir: Path
    name_template: str
    session_id: int

    def path_for(self, scan_number: int, started: float) -> Path:
        """The scan's file name; a name already taken gets a numbered variant, so nothing is overwritten."""
        path = self.output_dir / self.name_template.format(
            date=datetime.fromtimestamp(started).strftime("%y%m%d_%H%M"),
            session=self.session_id,
            scan=scan_number,
        )
        candidate, k = path, 1
        while candidate.exists() or record_path(candidate).exists():
            candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
            k += 1
        if candidate != path:
            log.warning("scan %d: %s exists; writing %s instead", scan_number, path.name, candidate.name)
        return candidate


def write_scan(counted: CountedScan, path: Path, record: ScanRecord) -> str | None:
    """Write the scan's HDF5 and then its stop record; returns the storage error, or None when stored."""
    image = counted_scan_image(counted)  # in memory: an error here is a bug, not a storage failure
    error = None
    try:
        write_file_atomically(path, image)
        record.sha256 = hashlib.sha256(image).hexdigest()
    except OSError as exc:  # only the disk: full, quota, EFBIG, read-only, gone
        record.status, record.path = ScanStatus.FAILED, None
        error = record.error = f"cannot write scan {record.scan_number} to {path.parent}: {exc}"
    del image
    record.written_time = _now()
    try:
        record.save(record_path(path))
    except OSError as exc:  # best effort when the scan failed; a lost record is fatal all the same
        error = error or f"cannot write the stop record of scan {record.scan_number} to {path.parent}: {exc}"
    return error


def check_output_dir(directory: Path) -> None:
    """Create the directory and a probe file in it; ScanWriterError naming the directory and the OS reason."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".stemstream-probe-", dir=directory)
        try:
            os.write(fd, b"probe")  # a full disk may still create an empty file, but not store a byte
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise ScanWriterError(f"scan output directory {directory} is not writable: {exc}") from exc


def _now() -> float:
    import time

    return time.time()
