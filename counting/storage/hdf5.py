"""HDF5 files written straight to disk, where a storage failure is one plain OSError and nothing else.

Left to write to disk itself (its sec2 driver), HDF5 2.x reacts badly to a full disk, a quota or EFBIG
(seen with h5py 3.16, HDF5 2.0): RuntimeError or OSError at random points, a file it cannot close, and a
crash at interpreter exit. Building the whole file in memory first avoids that but costs memory that grows
with the scan. Here HDF5 writes to disk as it goes, but never sees a storage error:

* It writes through a Python file object (h5py's ``fileobj`` driver), :class:`StorageFile`, which does the
  I/O itself with ``os.pwrite`` and, when the disk refuses, keeps the first OSError instead of handing it
  to HDF5. HDF5 carries on and closes normally; the owner then raises the kept error. What could not be
  stored is kept in memory meanwhile, so HDF5 reads back exactly what it wrote; that only happens after a
  failure, and the owner stops writing at the first one.
* Space is reserved on disk ahead of the writes (``posix_fallocate``, in growing steps; HDF5 truncates the
  unused rest when it closes the file): a full disk, a quota or a file-size limit shows up as a failed
  reservation, before anything of the file's content depends on it.
* The file has a temporary name in its destination directory, created with the permissions the umask
  allows (0666 & ~umask, as for any file a user creates), is fsynced, and gets its final name only when
  complete, with os.link, which never replaces an existing file (:class:`FinalName`; on a file system
  without hard links, an atomic rename that never replaces one). A complete file that can be named neither
  way is kept under a recoverable name (:class:`UnnamedFileError` says where), never removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from pathlib import Path

import h5py

from counting.errors import PermanentError
from counting.storage.durable import FinalName, fsync_directory

METADATA_CACHE = 2 << 20  # HDF5's metadata cache (it holds the event heaps being filled): fixed, not adaptive
RESERVE_MIN = 1 << 20  # first reservation step
RESERVE_MAX = 64 << 20  # steps double up to this
# File systems without fallocate (some FUSE mounts): no reservation, failures still come as kept errors.
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class StorageFile:
    """A file-like object over an open file descriptor, for h5py's ``fileobj`` driver, that never raises a
    storage error: the first OSError is kept in ``error`` (see the module docstring)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pos = 0
        self._end = 0  # the file's size as HDF5 knows it (written or truncated to), not the reservation
        self._reserved = 0  # bytes allocated on disk
        self._can_reserve = True
        self._overlay: list[tuple[int, bytes]] = []  # writes that could not be stored, in order
        self.error: OSError | None = None

    # ------------------------------------------------------------------------------------ for the owner
    def reserve(self, end: int) -> None:
        """Allocate disk space up to ``end`` now (a failure is kept in ``error``, like any other)."""
        if self.error is None and end > self._reserved:
            try:
                self._reserve(end, ahead=False)
            except OSError as exc:
                self.error = exc

    def check(self) -> None:
        """Raise the kept storage error, if any."""
        if self.error is not None:
            raise self.error

    # ------------------------------------------------------------------------------ file-like protocol
    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position (SEEK_END: the end HDF5 has written)."""
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._end}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        """The position."""
        return self._pos

    def write(self, data) -> int:
        """Store data at the position; a storage error is kept, never raised."""
        view = memoryview(data).cast("B")
        n, at = len(view), self._pos
        if self.error is None:
            try:
                if at + n > self._reserved:
                    self._reserve(at + n)
                done = 0
                while done < n:
                    done += os.pwrite(self._fd, view[done:], at + done)
            except OSError as exc:
                self.error = exc
        if self.error is not None:
            self._overlay.append((at, bytes(view)))
        self._pos = at + n
        self._end = max(self._end, self._pos)
        return n

    def read(self, size: int = -1) -> bytes:
        """Bytes from the position (zeros past the end, as HDF5's own drivers do)."""
        if size < 0:
            size = max(self._end - self._pos, 0)
        buf = bytearray(size)
        self.readinto(buf)
        return bytes(buf)

    def readinto(self, buf) -> int:
        """Fill buf from the position."""
        view = memoryview(buf).cast("B")
        n, at = len(view), self._pos
        got = 0
        with contextlib.suppress(OSError):  # a read error reads as zeros; the write error is what counts
            while got < n:
                k = os.preadv(self._fd, [view[got:]], at + got)
                if k == 0:
                    break
                got += k
        view[got:] = bytes(n - got)
        for start, data in self._overlay:  # later writes win, as on disk
            lo, hi = max(start, at), min(start + len(data), at + n)
            if lo < hi:
                view[lo - at : hi - at] = data[lo - start : hi - start]
        self._pos = at + n
        return n

    def truncate(self, size: int | None = None) -> int:
        """Set the size (HDF5 calls this with its end of allocation when it closes the file)."""
        size = self._pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
                self._reserved = size
            except OSError as exc:
                self.error = exc
        self._end = size
        return size

    def flush(self) -> None:
        """Nothing to do: writes go straight to the OS (fsync is the owner's, once)."""

    def readable(self) -> bool:  # noqa: D102 - file-like protocol
        return True

    def writable(self) -> bool:  # noqa: D102 - file-like protocol
        return True

    def seekable(self) -> bool:  # noqa: D102 - file-like protocol
        return True

    # --------------------------------------------------------------------------------------- internal
    def _reserve(self, end: int, ahead: bool = True) -> None:
        """Allocate up to end, and a step beyond it when there is room (a nearly full disk still takes
        what fits: only space the file needs now can fail it)."""
        if not self._can_reserve:
            return
        step = min(max(self._reserved, RESERVE_MIN), RESERVE_MAX) if ahead else 0
        for target in dict.fromkeys((max(end, self._reserved + step), end)):
            try:
                os.posix_fallocate(self._fd, self._reserved, target - self._reserved)
            except OSError as exc:
                if exc.errno in _NO_FALLOCATE:
                    self._can_reserve = False
                    return
                if target == end:
                    raise
                continue
            self._reserved = target
            return


class UnnamedFileError(PermanentError, OSError):
    """A complete file could not take its final name (neither a hard link nor a no-replace rename works
    there); it is kept, complete and fsynced, at ``kept``."""

    def __init__(self, cause: OSError, final: Path, kept: Path) -> None:
        super().__init__(cause.errno, f"{cause.strerror or cause}; the complete file is kept as {kept}")
        self.final, self.kept = final, kept


class TempHDF5:
    """An HDF5 file being written under a temporary name beside its final one (``.<name>.<random>.partial``).

    ``close()`` finishes it (raising the storage error, if there was one), ``link(path)`` gives it its final
    name, ``discard()`` removes it; use it as a context manager to discard it on any way out but a link.
    ``settle()`` is the writer's way out: it removes an unfinished file but keeps a complete one that has no
    final name under a recoverable name, and a complete file that cannot be named (UnnamedFileError) is kept
    too: a complete, fsynced file is only ever removed by an explicit ``discard()``.
    """

    def __init__(
        self, directory: Path, name: str, reserve: int = 0, final_name: FinalName | None = None
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.fd, path = create_temporary(directory, name, "partial")
        self.path: Path | None = path  # None once named or kept: nothing of it is ours to remove then
        self.final_name = final_name or FinalName()
        self.complete = False  # closed and fsynced
        self.storage = StorageFile(self.fd)
        self.h5: h5py.File | None = None
        try:
            if reserve:
                self.storage.reserve(reserve)
                self.storage.check()  # no room: fail now, before HDF5 starts
            self.h5 = h5py.File(self.storage, "w")
            _bound_metadata_cache(self.h5)
        except BaseException:
            self.discard()
            raise

    def __enter__(self) -> TempHDF5:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def close(self) -> None:
        """Close the HDF5 file and fsync it; raises the storage error (OSError) if anything was not stored."""
        if self.h5 is not None:
            h5, self.h5 = self.h5, None
            h5.close()
        self.storage.check()
        os.fsync(self.fd)
        self.complete = True

    def sha256(self) -> str:
        """Hex sha256 of the file's bytes (after close), read in 1 MiB chunks."""
        h = hashlib.sha256()
        offset = 0
        while chunk := os.pread(self.fd, 1 << 20, offset):
            h.update(chunk)
            offset += len(chunk)
        return h.hexdigest()

    def link(self, path: Path) -> None:
        """Give the closed file its final name; FileExistsError if that is taken (nothing is replaced, the
        file stays, a later call may try another name). UnnamedFileError if this file system can name it
        neither way: the complete file is then kept under a recoverable name (``kept``), never removed."""
        try:
            renamed = self.final_name.publish(self.path, path)
        except FileExistsError:
            raise
        except OSError as exc:
            raise UnnamedFileError(exc, path, self.keep()) from exc
        self._release(unlink=not renamed)  # linked: the temporary name goes, the file stays
        self.path = None

    def keep(self) -> Path | None:
        """Keep the file under ``.<name>.<random>.kept`` beside it (not a temporary name, which a sweep of
        stale temporary files might remove), or where it is if even that fails; returns its path."""
        kept = self.path
        if kept is not None:
            with contextlib.suppress(OSError):
                fd, placeholder = create_temporary(kept.parent, self.name, "kept")
                os.close(fd)
                os.rename(kept, placeholder)  # replaces only the empty placeholder just made: ours
                kept = placeholder
                fsync_directory(kept.parent)
        self._release(unlink=False)
        self.path = None
        return kept

    def settle(self) -> Path | None:
        """The end of the file's life: an unfinished file is removed, a complete one without its final name
        is kept (its path returned), a named one is left alone."""
        if self.complete and self.path is not None:
            return self.keep()
        self.discard()
        return None

    def discard(self) -> None:
        """Close and remove the temporary file, whatever it holds (never raises)."""
        if self.h5 is not None:
            h5, self.h5 = self.h5, None
            with contextlib.suppress(Exception):  # the storage error, if any, is what the owner reports
                h5.close()
        self._release(unlink=True)
        self.path = None

    def _release(self, unlink: bool) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if unlink and self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)


def _bound_metadata_cache(f: h5py.File) -> None:
    """Keep HDF5's metadata cache at a fixed size (by default it may grow to 32 MB as the file grows)."""
    config = f.id.get_mdc_config()
    config.set_initial_size = True
    config.initial_size = config.min_size = config.max_size = METADATA_CACHE
    f.id.set_mdc_config(config)


def create_temporary(directory: Path, name: str, suffix: str) -> tuple[int, Path]:
    """Create ``<directory>/.<name>.<random>.<suffix>`` exclusively, mode 0666 & ~umask; (fd, path)."""
    for _ in range(100):
        path = directory / f".{name}.{secrets.token_hex(4)}.{suffix}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        return fd, path
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(directory / f".{name}.*.{suffix}"))
