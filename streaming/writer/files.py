"""A finished scan onto disk: the HDF5 (written while it streamed: counting.scan_file) under its final name,
never over an existing file, and its stop record.

Storage failures are reported, not raised: the record then says "failed" with the OS reason and the
caller decides (the scan writer stops its host: every later scan would fail the same way). A complete,
fsynced file is never removed: one that cannot take its final name is kept under a recoverable name,
which its stop record gives (``kept_file``), with its checksum.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from counting.errors import PermanentError
from counting.scan_file import ScanFile
from counting.storage.hdf5 import FinalName, UnnamedFileError
from streaming.protocol.record import ScanRecord, ScanStatus, record_path

log = logging.getLogger(__name__)


class ScanWriterError(PermanentError, RuntimeError):
    """The scan writer cannot store scans: its output directory is unusable or a scan failed to write."""


_ID_IN_NAME = re.compile(r"_(\d{5,})_\d{5,}(?:-\d+)?\.h5$")  # FOURD_<date>_<id>_<scan>.h5
_STATE_DIR = ".stemstream"


class ScanIds:
    """Unique scan ids for one output directory: they never repeat there, across sessions, restarts and
    writers, whatever the scan numbers do (the detector resets them). The last id is kept in
    ``.stemstream/last-scan-id`` under a file lock; ids already in file names count too, so a lost
    counter file cannot bring an id back."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def next(self) -> int:
        """Take the next id."""
        state = self.directory / _STATE_DIR
        state.mkdir(parents=True, exist_ok=True)
        counter = state / "last-scan-id"
        with open(state / "scan-ids.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another writer on this directory waits here, briefly
            try:
                last = int(counter.read_text()) if counter.exists() else 0
            except ValueError:
                last = 0
            taken = (_ID_IN_NAME.search(p.name) for p in self.directory.glob("*.h5"))
            last = max([last, *(int(m.group(1)) for m in taken if m)])
            tmp = counter.with_name(".last-scan-id.partial")
            tmp.write_text(str(last + 1))
            os.replace(tmp, counter)
        return last + 1


@dataclass(frozen=True)
class ScanNaming:
    """File names of scans: production's FOURD_<yymmdd_HHMM>_<id:05>_<scan:05>.h5 by default, the time in
    the facility's time zone, so stempy's get_scan_path finds a scan by its unique id."""

    output_dir: Path
    name_template: str
    session_id: int
    timezone: str

    def path_for(self, scan_id: int, scan_number: int, started: float) -> Path:
        """The scan's file name; a name already taken gets a numbered variant, so nothing is overwritten."""
        date = datetime.fromtimestamp(started, ZoneInfo(self.timezone)).strftime("%y%m%d_%H%M")
        path = self.output_dir / self.name_template.format(
            date=date, id=scan_id, scan=scan_number, session=self.session_id
        )
        candidate, k = path, 1
        while candidate.exists() or record_path(candidate).exists():
            candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
            k += 1
        if candidate != path:
            log.warning("scan %d: %s exists; writing %s instead", scan_number, path.name, candidate.name)
        return candidate


def write_scan(
    scan_file: ScanFile, metadata: dict, path: Path, record: ScanRecord, renamed: Callable[[], Path]
) -> str | None:
    """Finish the scan's HDF5 (written while the scan streamed), give it its final name and write its stop
    record; returns the storage error, or None when stored. ``renamed`` gives another free name, for a
    name taken meanwhile (nothing is ever replaced)."""
    error = None
    try:
        scan_file.finish(metadata)
        record.sha256 = scan_file.sha256()
        path = _link(scan_file, path, renamed)
        record.path = str(path)
    except Exception as exc:  # noqa: BLE001 - full disk, quota, EFBIG, read-only, gone, or HDF5's own error
        # An unfinished file goes; a complete one is kept (the only copy of the counted data).
        kept = exc.kept if isinstance(exc, UnnamedFileError) else scan_file.settle()
        record.status, record.path = ScanStatus.FAILED, None
        if kept is None:
            record.sha256 = None
        else:
            record.extra["kept_file"] = str(kept)
        error = record.error = f"cannot write scan {record.scan_number} to {path.parent}: {exc}"
    record.written_time = _now()
    try:
        record.save(record_path(path))
    except OSError as exc:  # best effort when the scan failed; a lost record is fatal all the same
        error = error or f"cannot write the stop record of scan {record.scan_number} to {path.parent}: {exc}"
    return error


def _link(scan_file: ScanFile, path: Path, renamed: Callable[[], Path]) -> Path:
    for _ in range(10):
        try:
            scan_file.link(path)
            return path
        except FileExistsError:
            taken, path = path, renamed()
            log.warning("%s appeared meanwhile; writing %s instead", taken.name, path.name)
    scan_file.link(path)  # the last try: FileExistsError is then the failure
    return path


def check_output_dir(directory: Path, final_name: FinalName | None = None) -> None:
    """Create the directory and a probe file in it, and give the probe a final name the way the writer will
    (a hard link, else a no-replace rename); ScanWriterError naming the directory and the OS reason."""
    final_name = final_name or FinalName()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".stemstream-probe-", dir=directory)
        named = probe + ".named"
        try:
            os.write(fd, b"probe")  # a full disk may still create an empty file, but not store a byte
            os.fsync(fd)
            try:
                final_name.publish(Path(probe), Path(named))
            except FileExistsError:
                raise
            except OSError as exc:
                raise ScanWriterError(
                    f"scan output directory {directory} cannot give finished scans their names: neither a "
                    f"hard link nor a rename that never replaces a file works there ({exc})"
                ) from exc
        finally:
            os.close(fd)
            for name in (probe, named):  # the probe's own names, nothing else
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
    except OSError as exc:
        raise ScanWriterError(f"scan output directory {directory} is not writable: {exc}") from exc


def _now() -> float:
    import time

    return time.time()
