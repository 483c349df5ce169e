"""Hot-path ZeroMQ helpers shared by the aggregator and its forwarding processes: draining a receiver
socket in bounded batches, and sending a routed message zero-copy without blocking."""

from __future__ import annotations

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
    """Hand up to ``batch`` waiting messages to ``handle`` without blocking; ends early once ``stop()``."""
    for _ in range(batch):
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        handle(parts)
        if stop():
            return
