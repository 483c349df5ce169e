"""Small helpers shared by the tests, the fixtures and the pipeline harness: the CLI command line, loopback
ports, bounded polling, process liveness and stopping.

Ports: under pytest-xdist several workers pick ports at the same time, and a port the kernel hands out for
``bind(("", 0))`` comes from the ephemeral range that every outgoing connection also draws its source port
from, so a port picked and bound a moment later could be taken. :func:`free_port` therefore picks from a
range below the ephemeral range, one range per xdist worker (``PYTEST_XDIST_WORKER``), and never hands out
the same port twice in one process.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CLI = [sys.executable, "-m", "flows.cli"]  # `stemstream`, run by this interpreter

# Ports 20000..31999 lie below Linux's default ephemeral range (32768..60999): 12 ranges of 1000 ports.
_PORT_BASE, _PORT_SPAN, _PORT_RANGES = 20000, 1000, 12
_given: set[int] = set()


def _worker_index() -> int:
    """0 for the main process (no xdist) and gw0, 1 for gw1, ..."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = "".join(c for c in name if c.isdigit())
    return int(digits or 0) % _PORT_RANGES


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, from this worker's own range, never the same twice
    in one process (bounded: one pass over the range, then the kernel's choice)."""
    first = _PORT_BASE + _worker_index() * _PORT_SPAN
    start = random.randrange(_PORT_SPAN)
    for offset in range(_PORT_SPAN):
        port = first + (start + offset) % _PORT_SPAN
        if port not in _given and _bindable(port):
            _given.add(port)
            return port
    with socket.socket() as s:  # the whole range in use: fall back to an ephemeral port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that were free a moment ago."""
    return [free_port() for _ in itertools.repeat(None, n)]


def strided_free_ports(n: int, paths: int, stride: int = 100) -> list[int]:
    """n base ports for an aggregator with `paths` forwarding processes (process i binds every receiver and
    the node address at port + i x stride): every base + i x stride free a moment ago, no two the same."""
    bases: list[int] = []
    taken: set[int] = set()
    for _ in range(200):  # bounded: a few tries per port at most, in practice
        if len(bases) == n:
            break
        base = free_port()
        strided = [base + i * stride for i in range(paths)]
        if taken.isdisjoint(strided) and all(p == base or _bindable(p) for p in strided):
            bases.append(base)
            taken.update(strided)
            _given.update(strided)
    if len(bases) < n:
        raise RuntimeError(f"no {n} ports with {paths} paths {stride} apart free on loopback")
    return bases


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll a condition (bounded); True as soon as it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def alive(pid: int) -> bool:
    """Whether a local process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_process(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM a child, SIGKILL it if it outlives ``grace`` seconds, and reap it (None: nothing to stop)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
