"""The counted-data tap: a PUB socket on the node publishing every counted batch (streaming.protocol.live), for
another consumer (a ptychography or tomography pipeline) to subscribe to. Off unless ``live.tap``.

Node i binds ``tcp://<live.tap_host>:<live.tap_port + i>`` once the aggregator has told it its index; it is
the only socket the live view side of stemstream listens on at the HPC side. PUB never waits: a subscriber
that falls ``tap_hwm`` batches behind loses batches (its own, nobody else's), and the per-node ``seq`` of
each batch and the totals in ``tap.end`` tell it what it missed.

The tap has its own ZeroMQ context: subscribers cost its I/O thread, never the node's, which decrypt the
data path. On loopback it is plain, as ever. On any other address it is a CURVE server with the node's key
pair (the session's nodes share one, ``streaming.curve.client_secret_file``) accepting those nodes' key and
``live.tap_clients``; without keys it refuses to start (one error line, ``refused`` says why) and the
node counts on without it.

Nothing a subscriber does reaches the node's counting: the node's calls only queue a copy of each message
(``tap_hwm`` of them; more are dropped and counted in ``failed``), and the tap's own thread sends them. The
socket is an XPUB in manual mode, so that thread sees every subscription and installs only those that can
match a tap message (``tap.begin``, ``tap.events``, ``tap.end`` or a prefix of one, ``""`` included): a
flood of distinct subscriptions from a local process (which stalled a plain PUB's sender for seconds in
benchmarks/bench_hostile_memory.py) is counted in ``refused_subscriptions`` and never grows the socket's
subscription table.
"""

from __future__ import annotations

import logging
import queue
import threading

import numpy as np
import zmq

from streaming.protocol import control as p
from streaming.protocol import live as live_wire
from streaming.settings import LiveSettings
from streaming.transport.security import (
    CurveClientConfig,
    CurveServerConfig,
    apply_server,
    load_public_keys,
    peer_curve,
)
from streaming.transport.topic_pub import is_loopback

log = logging.getLogger(__name__)
TOPICS = (live_wire.TAP_BEGIN, live_wire.TAP_EVENTS, live_wire.TAP_END)
SUBSCRIPTIONS_PER_TURN = 256  # subscription messages the tap thread handles between two sends


def allowed_topic(topic: bytes) -> bool:
    """True for a subscription that can match a tap message: "" or a prefix of one of TOPICS."""
    return any(kind.startswith(topic) for kind in TOPICS)


def tap_curve(live: LiveSettings, node: CurveClientConfig | None) -> CurveServerConfig | None:
    """The tap's CURVE server: the node's key pair, accepting the nodes' own key and live.tap_clients."""
    if node is None:
        return None
    server = peer_curve(node)[0]
    clients = (*server.allowed_clients, *load_public_keys(live.tap_clients))
    return CurveServerConfig(server.secret_key, server.public_key, clients)


def _secure(
    live: LiveSettings, node: CurveClientConfig | None
) -> tuple[CurveServerConfig | None, str | None]:
    """The tap's CURVE server config, or why the tap must stay off."""
    where = (
        "live.tap_curve is set"
        if is_loopback(live.tap_host)
        else f"live.tap_host {live.tap_host} is not loopback"
    )
    try:
        server = tap_curve(live, node)
    except (OSError, ValueError) as exc:  # SecurityError is a ValueError; its text never shows a key
        return None, f"{where} and the tap's CURVE keys cannot be used ({exc}); no tap (counting goes on)"
    if server is None:
        return None, (
            f"{where} and the session has no CURVE keys (streaming.curve): the tap would publish counted "
            "events to anyone who connects; no tap (counting goes on)"
        )
    return server, None


class LiveTap:
    """The node's tap socket; every call returns at once.

    curve: the node's CURVE keys (None: none); needed when the tap is not on loopback."""

    def __init__(self, name: str, live: LiveSettings, curve: CurveClientConfig | None = None) -> None:
        self.name, self.settings = name, live
        self.refused: str | None = None  # why the tap is off (it then never binds)
        self._curve: CurveServerConfig | None = None
        self._auth = None
        if live.tap_curve or not is_loopback(live.tap_host):
            self._curve, self.refused = _secure(live, curve)
            if self.refused is not None:
                log.error("%s: %s", name, self.refused)
        self._ctx = zmq.Context(io_threads=1)  # its own: subscribers never load the node's I/O threads
        self.socket: zmq.Socket | None = None
        self.address = ""
        self.seq = 0
        self.failed = 0  # messages not published: the tap's queue was full, or zmq refused them
        self.refused_subscriptions = 0  # subscriptions to topics no tap message has (never installed)
        self._queue: queue.Queue[list] = queue.Queue(maxsize=live.tap_hwm)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scan: dict = {}
        self._batches = self._frames = 0

    def welcome(self, node_index: int) -> None:
        """Bind on tap_port + node_index (again if the index changed)."""
        address = f"tcp://{self.settings.tap_host}:{self.settings.tap_port + node_index}"
        if address == self.address or self.refused is not None:
            return
        self._stop_thread()
        sock = self._ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.XPUB_MANUAL, 1)  # subscriptions are the tap thread's to install, or not
        sock.setsockopt(zmq.SNDHWM, self.settings.tap_hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, 1024)  # it takes only subscriptions (a few bytes) in
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:  # one ZAP handler for the tap's context, started with its first socket
            self._auth = apply_server(sock, self._curve, self._ctx, self._auth)
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:  # the tap is an extra: counting goes on without it
            log.error("%s: the tap cannot bind %s (%s); no tap", self.name, address, exc)
            sock.close(linger=0)
            self.socket, self.address = None, address
            return
        self.socket, self.address = sock, address
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"{self.name}-tap", daemon=True)
        self._thread.start()
        log.info("%s: counted-data tap on %s%s", self.name, address, " (CURVE)" if self._curve else "")

    def begin(self, begin: p.ScanBegin) -> None:
        """Announce a scan."""
        self._scan = {"scan_number": begin.scan_number, "scan_key": begin.scan_key, "node": self.name}
        self._batches = self._frames = 0
        header = {
            **self._scan,
            "width": begin.scan_width,
            "height": begin.scan_height,
            "expected_frames": begin.expected_frames,
            "node_index": begin.node_index,
            "n_nodes": begin.n_nodes,
        }
        self._send(live_wire.encode(live_wire.TAP_BEGIN, header))

    def batch(self, positions: np.ndarray, numbers: np.ndarray, masks: np.ndarray, events: object) -> None:
        """Publish one counted batch (``events``: the counting kernel's EventList)."""
        if self.socket is None:
            return
        header = {**self._scan, "seq": self.seq, "frames": len(positions)}
        arrays = {
            "positions": positions,
            "frame_numbers": numbers,
            "masks": masks,
            "offsets": events.offsets,
            "indices": events.indices,
        }
        self.seq += 1
        self._batches += 1
        self._frames += len(positions)
        self._send(live_wire.encode(live_wire.TAP_EVENTS, header, arrays))

    def end(self) -> None:
        """The node counted everything of the scan."""
        self._send(
            live_wire.encode(
                live_wire.TAP_END, {**self._scan, "batches": self._batches, "frames": self._frames}
            )
        )

    def close(self) -> None:
        """Stop the tap's thread, close the socket and the tap's context (nothing waits for subscribers)."""
        self._stop_thread()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.term()

    def _send(self, parts: list) -> None:
        """Queue a copy of the message for the tap's thread (the node's slot memory is reused at once)."""
        if self.socket is None:
            return
        try:
            self._queue.put_nowait([bytes(part) for part in parts])
        except queue.Full:
            self.failed += 1

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
            self._thread = None
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    def _run(self, sock: zmq.Socket) -> None:
        """The tap's thread: install the subscriptions that can match, send what the node queued."""
        while not self._stop.is_set():
            try:
                self._subscriptions(sock)
                try:
                    parts = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:
                self.failed += 1
            except Exception:  # noqa: BLE001 (a tap never ends the node; it says why and goes on)
                log.exception("%s: tap error", self.name)

    def _subscriptions(self, sock: zmq.Socket) -> None:
        for _ in range(SUBSCRIPTIONS_PER_TURN):
            try:
                message = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not message or message[0] not in (0, 1):
                continue  # not a subscription message
            topic = message[1:]
            if not allowed_topic(topic):
                self.refused_subscriptions += 1
                continue
            # manual mode: applies to the subscriber whose message was received last
            sock.setsockopt(zmq.SUBSCRIBE if message[0] == 1 else zmq.UNSUBSCRIBE, topic)
