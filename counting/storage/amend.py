"""Groups added to a finished scan file without ever putting its counted events at risk (the microscope's
metadata, the stream's phase fit): the file is never opened for writing.

A copy of it (checked against the checksum the writer recorded, so a file changed meanwhile is never
touched) gets the new groups, is fsynced and then takes the file's name in one atomic rename; a crash leaves
either the file as it was or the complete new one, never half of either, and a file that already has one of
the groups is refused (nothing is replaced). The copy costs one read and one write of the file, in 1 MiB
chunks (flat memory), once per scan, off the data path. The caller stages the scan's new stop record in
``before_replace`` (streaming.protocol.staged), so file and record never get out of step.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py

from counting.errors import PermanentError
from counting.storage.durable import file_sha256, fsync_directory
from counting.storage.hdf5 import create_temporary

_CHUNK = 1 << 20


class ScanAmendError(PermanentError, ValueError):
    """Groups cannot be added to a scan file (changed since written, already there, not HDF5)."""


def amend_scan_file(
    path: str | os.PathLike,
    write: Callable[[h5py.File], None],
    expected_sha256: str | None,
    *,
    refuse: Sequence[str],
    what: str,
    before_replace: Callable[[str], None] | None = None,
    error: type[Exception] = ScanAmendError,
) -> str:
    """Add groups to the finished file at ``path`` with ``write(f)`` on a checked copy renamed over it
    (module docstring); returns the new file's sha256. ``error`` (one line naming ``what``) if the file
    changed since ``expected_sha256`` was recorded, already has a group of ``refuse``, or is not HDF5;
    OSError for storage. ``before_replace(new_sha256)`` runs once the copy is complete and fsynced, just
    before it takes the file's name; if it raises, the file is left untouched."""
    path = Path(path)
    before = path.stat()
    try:
        with h5py.File(path, "r") as f:  # refuse before copying anything
            taken = [name for name in refuse if name in f]
    except OSError as exc:
        raise error(f"{path}: not a readable HDF5 file ({exc})") from exc
    if taken:
        raise error(f"{path.name} already has /{taken[0]}: nothing is replaced")
    fd, tmp = create_temporary(path.parent, path.name, what.split()[0])
    try:
        digest = _copy(path, fd)
        if expected_sha256 and digest != expected_sha256:
            raise error(
                f"{path.name} changed since it was written (sha256 {digest[:12]} is not the recorded "
                f"{expected_sha256[:12]}): {what} not added"
            )
        os.close(fd)
        fd = -1
        with h5py.File(tmp, "a") as f:
            write(f)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        new_digest = file_sha256(tmp)
        now = path.stat()
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns):
            raise error(f"{path.name} changed while its {what} was added")
        if before_replace is not None:
            before_replace(new_digest)
        os.replace(tmp, path)
        fsync_directory(path.parent)
        return new_digest
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _copy(source: Path, fd: int) -> str:
    """Copy ``source`` into ``fd`` (fsynced); its sha256."""
    h = hashlib.sha256()
    with open(source, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    os.fsync(fd)
    return h.hexdigest()
