"""Shared-memory blocks named after the process that made them (``stemstream-<pid>-<random>``), so that the
blocks of a node that died before it could unlink them (SIGKILL to its whole process group, the OOM
killer, a batch system's walltime) are found and removed by the next node started on the host: at the
default settings each is 340 MB of RAM that nothing else frees until the host reboots."""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

PREFIX = "stemstream-"
SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory


def create_block(size: int) -> SharedMemory:
    """A new shared-memory block of ``size`` bytes, named after this process."""
    return SharedMemory(name=f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}", create=True, size=size)


@dataclass(frozen=True)
class Swept:
    """What a sweep removed."""

    blocks: int
    bytes: int


def sweep_dead(shm_dir: Path = SHM_DIR) -> Swept:
    """Unlink this user's blocks whose process no longer exists; a block of a live process (or of one
    that cannot be told: another user's, a name not ours) is never touched."""
    blocks = size = 0
    uid = os.getuid()
    for path in sorted(shm_dir.glob(PREFIX + "*")) if shm_dir.is_dir() else []:
        pid = owner_pid(path.name)
        try:
            stat = path.stat()
        except OSError:
            continue  # gone meanwhile
        if pid is None or stat.st_uid != uid or _exists(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            blocks, size = blocks + 1, size + stat.st_size
    return Swept(blocks, size)


def owner_pid(name: str) -> int | None:
    """The pid in a block's name, or None when the name is not one of ours."""
    parts = name.removeprefix(PREFIX).split("-")
    if not name.startswith(PREFIX) or len(parts) != 2 or not parts[0].isdigit():
        return None
    return int(parts[0])


def _exists(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie, or another user's, counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
