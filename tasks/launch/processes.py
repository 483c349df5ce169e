"""Local child processes that are always stopped: the local backend's node streamers and aggregator."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class Child:
    """One started process and where its output goes."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while it runs."""
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The end of its log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """Starts processes in their own sessions and stops every one of them, children included."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)
    # In every child's environment (inherited by its own children): how stop() finds what is left of this
    # group without signalling a process group id that the system may have given to someone else since.
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        drop_env_prefix: str | None = None,
    ) -> Child:
        """Start a process; its stdout and stderr go to <log_dir>/<name>.log. drop_env_prefix: variables
        of this environment that the child must not inherit (e.g. settings it gets as a file instead)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**_inherited(drop_env_prefix), **(env or {}), _TOKEN: self.token},
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        child = Child(name, popen, log_path)
        self.children.append(child)
        log.info("started %s (pid %d), log %s", name, popen.pid, log_path)
        return child

    def dead(self) -> list[Child]:
        """Children that exited."""
        return [c for c in self.children if not c.alive()]

    def stop(self, grace: float = 10.0) -> dict[str, int | None]:
        """SIGTERM every running child's process group, wait up to grace seconds, then SIGKILL; then SIGKILL
        whatever is left of the group (counting workers of a child that died first); returns exit codes."""
        for c in self.children:
            if c.alive():  # not yet reaped: its pid, and so its process group id, is still ours
                _signal_group(c.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in self.children:
            try:
                c.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", c.name, c.pid, grace)
                _signal_group(c.popen, signal.SIGKILL)
                c.popen.wait(5)
        kill_carrying([self.token])  # by our token, never by a group id that may be reused
        codes = {c.name: c.popen.returncode for c in self.children}
        self.children = []
        return codes


_TOKEN = "STEMSTREAM_PROCESS_GROUP"


def carrying(token: str) -> list[int]:
    """Live processes whose environment carries this group token."""
    needle = f"{_TOKEN}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def kill_carrying(tokens: Sequence[str], grace: float = 3.0) -> None:
    """Stop every live process whose environment carries one of these group tokens (what is left of
    groups whose ProcessGroup object is gone: cleanup after a crash): SIGTERM first, so a node's writer can
    still write what was counted, up to grace seconds, then SIGKILL; then unlink the /dev/shm segments
    they had mapped (slot memory a killed node could not release)."""
    pids = [pid for token in tokens for pid in carrying(token)]
    segments = {seg for pid in pids for seg in _shm_segments(pid)}
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    left = [pid for token in tokens for pid in carrying(token)]  # and whatever they started meanwhile
    _signal_all(left, signal.SIGKILL)
    wait_until = time.monotonic() + 2.0
    while time.monotonic() < wait_until and any(_alive(pid) for pid in left):
        time.sleep(0.02)
    for seg in segments:
        with contextlib.suppress(OSError):
            seg.unlink()
            log.info("unlinked leftover shared memory %s", seg)


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie does not count: only its parent's wait is left)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _shm_segments(pid: int) -> set[Path]:
    """The /dev/shm files this process has mapped (its POSIX shared memory, e.g. a node's slot memory)."""
    found = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/dev/shm/") and not parts[5].endswith("(deleted)"):
                found.add(Path(parts[5].strip()))
    return found


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int):
    """A preexec_fn: the child gets SIGTERM (its clean stop) when the process that started it dies, even
    by SIGKILL, so no node, aggregator or view outlives its session holding ports and shared memory. (The
    signal follows the starting thread: the session starts its processes from its own long-lived thread.)"""

    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls into it

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nothing would signal us any more
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _inherited(drop_prefix: str | None) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not (drop_prefix and k.startswith(drop_prefix))}


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def rss_kb(pid: int, key: str = "VmRSS") -> int:
    """Resident memory of one process in kB from /proc/PID/status (0 when it is gone); key "RssAnon" is
    its private heap alone, without shared memory and mapped files, "VmHWM" its peak."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """pid and all its live descendants (counting workers of a node streamer, say), from /proc."""
    tree, todo = [], [pid]
    while todo:
        q = todo.pop()
        tree.append(q)
        for task in Path(f"/proc/{q}/task").glob("*"):  # no such directory once q is gone: nothing
            with contextlib.suppress(OSError, ValueError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return tree
