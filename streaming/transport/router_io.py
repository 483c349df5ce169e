"""Hot-path ZeroMQ helpers shared by the aggregator and its forwarding processes: draining a receiver
socket in bounded batches, and sending a routed message zero-copy, without blocking or waiting for room."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import zmq

# Plain ints: pyzmq's enum flag arithmetic costs more per message than the send itself.
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


def send_routed(router: zmq.Socket, identity: bytes, parts: list) -> None:
    """[identity, *parts] on a ROUTER, zero-copy, without blocking. Only the identity part can fail (Again:
    that peer's queue is full; EHOSTUNREACH: no such peer); once it is accepted the rest always is."""
    router.send(identity, _MORE, copy=False)
    for part in parts[:-1]:
        router.send(part, _MORE, copy=False)
    router.send(parts[-1], _LAST, copy=False)


def drain(sock: zmq.Socket, handle: Callable[[list], None], batch: int, stop: Callable[[], bool]) -> None:
    """Hand up to ``batch`` waiting messages to ``handle`` without blocking; takes none once ``stop()``.

    stop() is asked before every message, the first included: an owner that drains several sockets in one
    turn must not take a message from the next socket once one it cannot place yet is held (it would be
    dropped: the aggregator holds one sector of a new scan until the nodes are armed)."""
    for _ in range(batch):
        if stop():
            return
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        handle(parts)


class Sent(enum.Enum):
    """How a routed send that may wait for room ended."""

    SENT = "sent"
    UNREACHABLE = "unreachable"  # no such peer (it went away), or none to send to
    STALLED = "stalled"  # its queue stayed full for the whole timeout
    STOPPED = "stopped"  # the owner is stopping


def send_waiting(
    router: zmq.Socket,
    identity: Callable[[int], bytes | None],
    index: int,
    parts: list,
    timeout: float,
    stop: Callable[[], bool],
    wait: Callable[[], None],
) -> Sent:
    """Send [identity(index), *parts], retrying while the peer's queue is full, up to timeout seconds.

    identity(index) is asked again on every try (a peer may reconnect under a new identity meanwhile; None:
    gone); the peer is named by index, not by a closure, so a send allocates no function object.
    Between tries wait() runs: it must block briefly (ROUTER's POLLOUT means "some peer has room", so the
    owner waits on its own control input) and may service it.
    """
    start = None
    while True:
        peer = identity(index)
        if peer is None:
            return Sent.UNREACHABLE
        try:
            send_routed(router, peer, parts)
            return Sent.SENT
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            return Sent.UNREACHABLE
        if stop():
            return Sent.STOPPED
        now = time.monotonic()
        start = now if start is None else start  # the clock starts at the first refusal: sends mostly pass
        if now - start >= timeout:
            return Sent.STALLED
        wait()
