"""A publisher that never makes its caller wait: a bounded queue in front of an XPUB socket on its own
ZeroMQ context, sent from a thread of its own, installing only subscriptions that can match its topics.

Whoever publishes only queues a copy (``put_nowait``; a full queue drops the message and counts it), so a
slow or hostile subscriber costs the caller nothing. The socket is an XPUB in manual mode: the thread sees
every subscription and installs only those that can match one of the publisher's topics (a prefix of one,
``""`` included); a flood of other subscriptions is counted in ``refused_subscriptions`` and never grows the
socket's subscription table (the flood that stalled a plain PUB's sender in
benchmarks/bench_hostile_memory.py). Plain on loopback; a CURVE server when given one.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import threading

import zmq

from streaming.transport.security import CurveServerConfig, apply_server

log = logging.getLogger(__name__)
SUBSCRIPTIONS_PER_TURN = 256  # subscription messages handled between two sends


def is_loopback(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1, localhost); anything else may be reached by others."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or an interface name: assume reachable
        return False


class TopicPublisher:
    """An XPUB bound at ``address`` publishing messages whose first part is one of ``topics``."""

    def __init__(
        self,
        name: str,
        address: str,
        topics: tuple[bytes, ...],
        hwm: int = 16,
        curve: CurveServerConfig | None = None,
    ) -> None:
        self.name, self.topics = name, topics
        self.sent = 0
        self.failed = 0  # messages not published: the queue was full, or zmq refused them
        self.refused_subscriptions = 0
        self._ctx = zmq.Context(io_threads=1)  # its own: subscribers never load the caller's I/O threads
        self._auth = None
        sock = self._ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.XPUB_MANUAL, 1)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, 1024)  # it takes only subscriptions (a few bytes) in
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if curve is not None:
                self._auth = apply_server(sock, curve, self._ctx)
            sock.bind(address)
        except zmq.ZMQError as exc:
            self._close(sock)
            raise OSError(f"{name} cannot bind {address}: {exc}") from None
        self.socket = sock
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._queue: queue.Queue[list[bytes]] = queue.Queue(maxsize=hwm)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def allowed(self, topic: bytes) -> bool:
        """True for a subscription that can match a message: "" or a prefix of one of the topics."""
        return any(kind.startswith(topic) for kind in self.topics)

    def publish(self, parts: list) -> bool:
        """Queue a copy of a message for the thread; False (counted) when the queue is full."""
        try:
            self._queue.put_nowait([bytes(part) for part in parts])
            return True
        except queue.Full:
            self.failed += 1
            return False

    def close(self) -> None:
        """Stop the thread and close the socket and the context (nothing waits for subscribers)."""
        self._stop.set()
        self._thread.join(5)
        self._close(self.socket)

    def _close(self, sock: zmq.Socket) -> None:
        sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.term()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._subscriptions()
                try:
                    parts = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                self.socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                self.sent += 1
            except zmq.ZMQError:
                self.failed += 1
            except Exception:  # noqa: BLE001 (a publisher never ends its process; it says why and goes on)
                log.exception("%s: publisher error", self.name)

    def _subscriptions(self) -> None:
        for _ in range(SUBSCRIPTIONS_PER_TURN):
            try:
                message = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not message or message[0] not in (0, 1):
                continue  # not a subscription message
            topic = message[1:]
            if not self.allowed(topic):
                self.refused_subscriptions += 1
                continue
            # manual mode: applies to the subscriber whose message was received last
            self.socket.setsockopt(zmq.SUBSCRIBE if message[0] == 1 else zmq.UNSUBSCRIBE, topic)
