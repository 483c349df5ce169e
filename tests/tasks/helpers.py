"""Helpers shared by the tests of tasks/ and flows/ (SFAPI client id, SSH keys, waiting for a daemon's port);
ports, polling and process liveness come from stemstream_testing.support."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from stemstream_testing.support import alive, free_port, wait_until

__all__ = ["CLIENT_ID", "alive", "free_port", "keygen", "wait_port", "wait_until"]

CLIENT_ID = "abcdefghijklm"  # SFAPI client ids are 13 characters


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


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    """Return once a daemon (proc) listens on 127.0.0.1:port; raise if it exits or after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on port {port} within {timeout} s")
