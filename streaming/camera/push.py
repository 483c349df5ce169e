"""One emulated receiver thread's connection to the aggregator: a PUSH socket with production options.

Sockets follow production (interactEM's detstream-producer): SNDHWM 1000, a send timeout (10 s), plus
IMMEDIATE so nothing queues before the aggregator is there. A send that times out raises SenderError:
the aggregator is down, or not polling because its nodes are not all ready (the arm handshake).

Messages go out zero-copy (``copy=False``). The connection holds the latest message back, so the last one of
a scan can be sent tracked and waited for (flush); in real time (offer) a message the socket cannot take at
once is dropped instead of waited for, as a real receiver's full buffer loses frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import zmq

from counting.errors import TransientError
from counting.geometry import N_SECTORS

DEFAULT_HWM = 1000  # production sndhwm
DEFAULT_SEND_TIMEOUT = 10.0  # production sndtimeo, seconds
DEFAULT_LINGER = 10.0  # seconds to wait at exit for queued sectors to leave
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: pyzmq's enum flags cost more per message than the check


class SenderError(TransientError, RuntimeError):
    """A sender could not deliver its sectors; the message says which module and why."""


def address_for(addresses: Sequence[str], module: int) -> str:
    """Module m uses address m of four, or the single address for all modules (each may be a
    comma-separated list: the same receiver on every forwarding process of the aggregator)."""
    if len(addresses) == N_SECTORS:
        return addresses[module]
    if len(addresses) == 1:
        return addresses[0]
    raise ValueError(f"give 1 or {N_SECTORS} aggregator addresses, got {len(addresses)}")


class PushConnection:
    """One emulated receiver thread: a PUSH socket; keeps the latest message back so it can be tracked.

    copy: the sender's buffers are reused once sent, so libzmq copies each message when it is sent
    (otherwise messages go out zero-copy, referencing the sender's memory until sent).
    """

    def __init__(
        self,
        ctx: zmq.Context,
        address: str,
        hwm: int,
        send_timeout: float | None,
        label: str,
        *,
        copy: bool = False,
    ):
        self.label = label
        self.copy = copy
        self.address = address
        self._send_timeout = send_timeout
        self.socket = ctx.socket(zmq.PUSH)
        self.socket.sndhwm = hwm
        self.socket.immediate = (
            1  # queue only on a live connection: no silent buffering before the aggregator
        )
        self.socket.sndtimeo = -1 if send_timeout is None else int(send_timeout * 1000)
        # Comma-separated: the aggregator's forwarding processes; ZeroMQ spreads the sectors over them.
        for one in address.split(","):
            self.socket.connect(one.strip())
        self._pending: list | None = None

    def send(self, parts: list) -> None:
        """Queue a message; the previous one goes out now (so the last one can be sent tracked)."""
        if self._pending is not None:
            self._send(self._pending, track=False)
        self._pending = parts

    def offer(self, parts: list) -> bool:
        """Real time: as send, but the held message goes out only if the queue has room now.

        Returns False when it had none: that message is dropped (a full receiver buffer loses data).
        """
        ok = True
        if self._pending is not None:
            try:
                # NOBLOCK fails only on the first part (HWM full); once accepted, the rest always is.
                self.socket.send_multipart(self._pending, _NOBLOCK, copy=self.copy)
            except zmq.Again:
                ok = False
        self._pending = parts
        return ok

    def wait_connected(self) -> None:
        """Wait (up to the send timeout) until a connection can take data: IMMEDIATE queues nothing before.

        A camera's receivers are connected before a scan starts; without this the first sectors of a
        real-time scan would all overflow while TCP connects.
        """
        timeout = -1 if self._send_timeout is None else int(self._send_timeout * 1000)
        if not self.socket.poll(timeout, zmq.POLLOUT):
            raise SenderError(
                f"{self.label}: no connection to the aggregator at {self.address} after "
                f"{self._send_timeout:g} s (is it running?)"
            )

    def send_now(self, parts: list) -> None:
        """Send after the held message, untracked (garbage messages), keeping the order."""
        if self._pending is not None:
            self._send(self._pending, track=False)
            self._pending = None
        self._send(parts, track=False)

    def flush(self, linger: float) -> None:
        """Send the held message tracked and wait until ZeroMQ has handed it (and all before) to the OS."""
        if self._pending is None:
            return
        if self.copy:  # tracking needs a zero-copy send: of memory of its own, which nothing reuses
            self._pending = [bytes(memoryview(part)) for part in self._pending]
        tracker = self._send(self._pending, track=True)
        self._pending = None
        if tracker is None:
            return
        try:
            tracker.wait(linger)
        except zmq.NotDone:
            raise SenderError(
                f"{self.label}: sectors still queued for {self.address} after {linger:g} s at exit; "
                "they would be lost (the aggregator stopped reading?)"
            ) from None

    def close(self, linger: float) -> None:
        """Close the socket, waiting up to linger seconds for anything still queued (0 after a failure)."""
        self.socket.close(linger=int(linger * 1000))

    def _send(self, parts: list, track: bool) -> zmq.MessageTracker | None:
        try:
            return self.socket.send_multipart(parts, copy=self.copy and not track, track=track)
        except zmq.Again:
            raise SenderError(
                f"{self.label}: the aggregator at {self.address} took no data for {self._send_timeout:g} s "
                "(is it running, and are all its nodes connected and ready?)"
            ) from None
