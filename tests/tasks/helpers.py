"""Helpers shared by the tests of tasks/ (processes, ports, keys)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

CLIENT_ID = "abcdefghijklm"  # SFAPI client ids are 13 characters


def alive(pid: int) -> bool:
    """Whether a local process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll a condition (bounded); True as soon as it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, passphrase: str = "") -> Path:
    """A new ed25519 key pair (path, path.pub) made with ssh-keygen."""
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-a",
            "4",
            "-N",
            passphrase,
            "-C",
            "stemstream-test",
            "-f",
            str(path),
        ],
        check=True,
    )
    return path
