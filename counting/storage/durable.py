"""What makes a file durable and identifiable: fsync of a directory entry, a final name that never replaces
another file (FinalName), and a file's sha256.

Standard library only, so the light modules (the stop record, settings) can use it without loading
numpy or h5py."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20
_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100


def fsync_directory(directory: str | os.PathLike) -> None:
    """fsync a directory, so the names created or renamed in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (constant memory for files of any size)."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class FinalName:
    """How a complete temporary file takes its final name without ever replacing an existing file: a hard
    link, or where the file system has none, Linux's renameat2(RENAME_NOREPLACE). Subclass it to stand in
    for a file system that lacks either (tests)."""

    def link(self, src: Path, dst: Path) -> None:
        """os.link: FileExistsError if dst is taken."""
        os.link(src, dst)

    def rename(self, src: Path, dst: Path) -> None:
        """An atomic rename that fails with FileExistsError rather than replace dst; OSError (ENOSYS,
        EINVAL...) where the kernel or file system cannot do it."""
        libc = ctypes.CDLL(None, use_errno=True)
        call = getattr(libc, "renameat2", None)
        if call is None:
            raise OSError(errno.ENOSYS, "renameat2 is not available", str(dst))
        if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
            err = ctypes.get_errno()
            raise (FileExistsError if err == errno.EEXIST else OSError)(err, os.strerror(err), str(dst))

    def publish(self, src: Path, dst: Path) -> bool:
        """Give src the name dst (link, else no-replace rename), the directory entry fsynced; True when src
        is gone (renamed), False when it is still a second name of the file (linked). FileExistsError if dst
        is taken; the rename's OSError if neither works (src is then untouched)."""
        try:
            self.link(src, dst)
            renamed = False
        except FileExistsError:
            raise
        except OSError:  # no hard links here (EPERM, ENOTSUP), EMLINK, ENOSPC for the entry...
            self.rename(src, dst)
            renamed = True
        fsync_directory(dst.parent)
        return renamed
