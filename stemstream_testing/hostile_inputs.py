"""The audit's hostile inputs (tests/hostile/), as paced senders at a running pipeline's ports, for
benchmarks/bench_hostile_memory.py: each attacker is a thread that cycles through its port's kinds of
hostile message until stopped and counts what it sent, per kind.

Every attacker is a peer on loopback, as any local process could be: it speaks the port's socket type
(PUSH to a receiver port, DEALER to a ROUTER, XSUB to a PUB) and sends what the audit found could hurt:
oversized and malformed sector headers (the 65535x65535 scan), wrong-typed control messages, garbage
frames, messages beyond ZMQ_MAXMSGSIZE, stray sectors of other scan numbers, malformed live snapshots, and
on the page bad Host, Origin and token requests and more WebSocket clients than it serves.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import msgpack
import numpy as np
import zmq

from counting.geometry import SECTOR_BYTES
from streaming.protocol import control as p
from streaming.protocol import live as live_wire
from streaming.protocol import paths as f
from streaming.protocol.sector import MAX_MESSAGE_BYTES

HUGE = [7, 0, 0, 65535, 65535, 0, 0, 0, 0]  # the audit's header: 4.29e9 positions (34 GB of images)
Message = list[bytes]


@dataclass
class Attack:
    """One port under attack: its name, its address, and what was sent to it, per kind."""

    port: str
    address: str
    sent: Counter = field(default_factory=Counter)
    not_taken: int = 0  # messages the socket would not take at once (peer gone or queue full)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Messages (or requests) sent, all kinds."""
        return sum(self.sent.values())


def _junk(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


# ------------------------------------------------------------------------------------ message kinds
def sector_kinds(stray_first: int) -> dict[str, Callable[[random.Random, int], Message]]:
    """Hostile messages for a receiver port (the aggregator's or a forwarder's PULL), by kind; ``i`` counts
    the calls, so stray sectors come for a few scan numbers from ``stray_first`` on."""
    zero = bytes(SECTOR_BYTES)

    def stray(_rng: random.Random, i: int) -> Message:
        # A 2x2 scan of another number, one sector of module i % 4: a scan begun by strays ends at the
        # deadline, incomplete and reported (each number a scan of its own: few numbers, few sectors).
        number, k = stray_first + (i // 40) % 3, i % 4
        return [msgpack.packb([number, k + 1, 4, 2, 2, k % 2, k // 2, 0, k]), zero]

    return {
        "huge_scan_65535x65535": lambda _r, i: [msgpack.packb([*HUGE[:1], i, *HUGE[2:]]), zero],
        "header_out_of_range": lambda r, i: [
            msgpack.packb([1, i, 0, 70000, 2**33, 0, 0, 0, r.choice([4, 9, 255])]),
            zero,
        ],
        "header_wrong_types": lambda _r, i: [msgpack.packb(["7", i, 1.5, None, [1], {}, 0, 0, 0]), zero],
        "header_not_msgpack": lambda r, _i: [b"\xc1" + _junk(r, 15), zero],
        "header_wrong_arity": lambda _r, i: [msgpack.packb([7, i, 0, 4, 4]), zero],
        "position_outside_scan": lambda _r, i: [msgpack.packb([7, i, 0, 4, 4, 9, 9, 0, 0]), zero],
        "short_payload": lambda _r, i: [msgpack.packb([7, i, 0, 4, 4, 0, 0, 0, 0]), bytes(100)],
        "garbage_one_part": lambda r, _i: [_junk(r, r.randrange(1, 64))],
        "garbage_three_parts": lambda r, _i: [_junk(r, 8), _junk(r, 8), _junk(r, 8)],
        "stray_sector_other_scan": stray,
    }


def oversized(_i: int) -> tuple[str, Message]:
    """One part beyond every data socket's ZMQ_MAXMSGSIZE: ZeroMQ drops the connection that sends it."""
    return "beyond_maxmsgsize", [msgpack.packb([7, 0, 0, 4, 4, 0, 0, 0, 0]), bytes(MAX_MESSAGE_BYTES + 4096)]


def sized(kind: bytes, *sizes: tuple[str, int]) -> Callable[[int], tuple[str, Message]]:
    """Large messages [kind, zeros] of these sizes in turn, for zmq_attack's ``big``."""
    return lambda i: (sizes[i % len(sizes)][0], [kind, bytes(sizes[i % len(sizes)][1])])


def control_kinds(own_name: str) -> dict[str, Callable[[random.Random, int], Message]]:
    """Hostile messages for the aggregator's node socket: wrong types, garbage, and a node's name claimed
    from another connection (``own_name``: a real node's)."""
    return {
        "hello_name_list": lambda _r, _i: [p.HELLO, msgpack.packb({"name": [1], "pid": 1})],
        "hello_not_msgpack": lambda _r, _i: [p.HELLO, b"\xc1"],
        "ready_no_body": lambda _r, _i: [p.READY],
        "done_wrong_types": lambda _r, _i: [p.DONE, msgpack.packb({"name": "x", "scan_number": "1"})],
        "hb_huge_scan_number": lambda _r, _i: [p.HEARTBEAT, msgpack.packb({"name": "x", "state": "s",
                                                                           "scan_number": 2**40})],
        "unknown_kind": lambda r, _i: [b"junk", _junk(r, 12)],
        "garbage_parts": lambda r, _i: [_junk(r, 4) for _ in range(r.randrange(1, 5))],
        "hello_new_name_slots_full": lambda _r, i: p.encode(p.Hello(f"stranger{i % 64}", 1)),
        "claims_a_nodes_name": lambda _r, i: p.encode(
            [p.Ready(own_name), p.WriterAt(own_name, "tcp://evil.example:1", ""), p.Done(
                own_name, 99, 1, 1, 0, "complete")][i % 3]
        ),
    }  # fmt: skip


def forwarder_node_kinds(own_name: str) -> dict[str, Callable[[random.Random, int], Message]]:
    """Hostile messages for a forwarding process's node socket (attach is all it takes)."""
    return {
        "attach_a_nodes_name": lambda _r, _i: p.encode(p.Attach(name=own_name)),
        "attach_new_names": lambda _r, i: p.encode(p.Attach(name=f"stranger{i}")),
        "attach_wrong_types": lambda _r, _i: [p.ATTACH, msgpack.packb({"name": 5, "path": "x"})],
        "unknown_kind": lambda r, _i: [b"junk", _junk(r, 12)],
        "garbage_parts": lambda r, _i: [_junk(r, 4) for _ in range(r.randrange(1, 5))],
    }


def hub_kinds() -> dict[str, Callable[[random.Random, int], Message]]:
    """Hostile messages for the aggregator's forwarder hub (a stranger on loopback)."""
    return {
        "progress_wrong_types": lambda _r, _i: [b"f.progress", msgpack.packb({"index": 1, "received": "x"})],
        "progress_from_a_stranger": lambda _r, _i: f.encode(f.Progress(index=1, received=10**6)),
        "up_with_a_wrong_pid": lambda _r, _i: f.encode(f.Up(index=1, receivers=[], nodes="tcp://evil:1",
                                                            pid=1)),
        "stop_from_a_stranger": lambda _r, _i: f.encode(f.Stop()),
        "unknown_kind": lambda r, _i: [b"f.junk", _junk(r, 12)],
        "garbage_parts": lambda r, _i: [_junk(r, 4) for _ in range(r.randrange(1, 5))],
    }  # fmt: skip


def writer_kinds() -> dict[str, Callable[[random.Random, int], Message]]:
    """Hostile messages for the scan writer's socket (H1): wrong types, a huge scan, garbage."""

    def begin(**changes: object) -> bytes:
        body = dict(name="x", scan_number=9_000_000, scan_width=8, scan_height=8, n_nodes=1, node_index=0)
        return msgpack.packb(body | changes)

    return {
        "begin_width_a_string": lambda _r, _i: [p.W_BEGIN, begin(scan_width="8")],
        "begin_huge_scan_65535x65535": lambda _r, _i: [p.W_BEGIN, begin(scan_width=65535, scan_height=65535)],
        "begin_no_nodes": lambda _r, _i: [p.W_BEGIN, begin(n_nodes=0)],
        "samples_too_few_parts": lambda _r, _i: [p.W_SAMPLES],
        "events_wrong_header": lambda _r, _i: [p.W_EVENTS, begin(), b"1"],
        "done_unknown_scan": lambda _r, _i: p.encode(
            p.NodeScanDone("x", 8_999_999, 1, 1, 1, 0, 0, "complete")
        ),
        "unknown_kind": lambda r, _i: [b"w.junk", _junk(r, 12)],
        "garbage_parts": lambda r, _i: [_junk(r, 4) for _ in range(r.randrange(1, 5))],
    }  # fmt: skip


_GEOMETRY = {"cx": 288.0, "cy": 288.0, "bf_radius": 100.0, "adf_inner": 120.0, "adf_outer": 250.0}


def snapshot_header(**changes: object) -> dict:
    """A valid snapshot header (a 3x2 scan of node a), with some fields changed."""
    h = {
        "node": "a", "node_index": 0, "n_nodes": 2, "scan_number": 3, "scan_key": "hostile", "width": 3,
        "height": 2, "expected_frames": 6, "seq": 1, "final": False, "frames": 3, "sectors": 11,
        "events": 9, "geometry": dict(_GEOMETRY), "dropped_batches": 0, "dropped_snapshots": 0,
        "counted_at": 1.0, "oldest_at": 1.0, "lo": 0, "hi": 6,
    }  # fmt: skip
    return h | changes


def _snap(header: dict, arrays: dict[str, np.ndarray] | None = None) -> Message:
    return [bytes(memoryview(x)) for x in live_wire.encode(live_wire.SNAP, header, arrays)]


def snapshot_kinds() -> dict[str, Callable[[random.Random, int], Message]]:
    """Malformed live snapshots (M2, H2's view side) for the view's intake."""
    six = {k: np.full(6, 2, np.int64) for k in ("counts", "bf", "adf", "sum_col", "sum_row")}
    return {
        "huge_scan_65535x65535": lambda _r, i: _snap(snapshot_header(width=65535, height=65535, hi=0,
                                                                     scan_key=f"h{i % 8}")),
        "width_infinite": lambda _r, _i: _snap(snapshot_header(width=float("inf"), hi=0)),
        "width_a_bool": lambda _r, _i: _snap(snapshot_header(width=True, hi=0)),
        "header_not_a_map": lambda _r, _i: [live_wire.SNAP, msgpack.packb([1, 2, 3])],
        "header_not_msgpack": lambda r, _i: [live_wire.SNAP, b"\xc1" + _junk(r, 8)],
        "dtype_not_allowed": lambda _r, _i: [live_wire.SNAP, msgpack.packb({"arrays": [["x", "V8", 1]]}),
                                             bytes(8)],
        "array_lengths_lie": lambda _r, _i: [live_wire.SNAP, msgpack.packb(
            {**snapshot_header(), "arrays": [["counts", "<i8", 10**9]]}), bytes(8)],
        "arrays_missing": lambda _r, _i: _snap(snapshot_header(), six),
        "n_nodes_huge": lambda _r, i: _snap(snapshot_header(n_nodes=10**9, node=f"n{i}", hi=0)),
        "unknown_kind": lambda r, _i: [b"live.junk", _junk(r, 12)],
        "garbage_one_part": lambda r, _i: [_junk(r, 16)],
    }  # fmt: skip


# ----------------------------------------------------------------------------------------- senders
class Pacer:
    """Sleeps so that a loop runs at most ``rate`` times a second."""

    def __init__(self, rate: float) -> None:
        self.interval, self.next = 1.0 / rate, time.monotonic()

    def wait(self) -> None:
        """Sleep until the next turn."""
        self.next += self.interval
        delay = self.next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -1.0:  # far behind (a loaded machine): do not burst to catch up
            self.next = time.monotonic()


def _socket(kind: int, address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.linger = 0
    sock.sndhwm = 100
    sock.connect(address)
    return sock


def zmq_attack(
    attack: Attack,
    kind: int,
    kinds: dict[str, Callable[[random.Random, int], Message]],
    stop: threading.Event,
    rate: float,
    big: tuple[float, Callable[[int], tuple[str, Message]]] | None = None,
    limits: dict[str, int] | None = None,
) -> None:
    """Cycle through ``kinds`` on one socket of ``kind`` at ``rate`` messages/s until stop; ``big``: (per
    second, maker of (kind, message)): large messages, each on a socket of its own (one beyond MAXMSGSIZE
    ends its connection); ``limits``: kinds sent at most so many times (then skipped)."""
    rng = random.Random(attack.port)
    sock = _socket(kind, attack.address)
    pacer, names = Pacer(rate), itertools.cycle(sorted(kinds))
    next_big, counter = time.monotonic(), itertools.count()
    try:
        while not stop.is_set():
            i = next(counter)
            name = next(names)
            if limits and attack.sent[name] >= limits.get(name, i + 1):
                continue
            try:
                sock.send_multipart(kinds[name](rng, i), zmq.NOBLOCK)
                attack.sent[name] += 1
            except zmq.Again:
                attack.not_taken += 1
            if big is not None and time.monotonic() >= next_big:
                next_big = time.monotonic() + 1.0 / big[0]
                _send_big(attack, kind, *big[1](i))
            pacer.wait()
    finally:
        sock.close(linger=0)


def _send_big(attack: Attack, kind: int, name: str, message: Message) -> None:
    """One message on a fresh connection, given a moment to leave before the socket closes."""
    sock = _socket(kind, attack.address)
    try:
        sock.linger = 500
        sock.send_multipart(message, zmq.NOBLOCK)
        attack.sent[name] += 1
    except zmq.Again:
        attack.not_taken += 1
    finally:
        sock.close()


def subscription_attack(attack: Attack, stop: threading.Event, rate: float, topic_bytes: int) -> None:
    """An XSUB on a PUB port (the monitor, a tap): distinct subscriptions of ``topic_bytes`` each, garbage
    frames (neither a subscribe nor a cancel), cancels of what was never subscribed."""
    rng = random.Random(attack.port)
    sock = _socket(zmq.XSUB, attack.address)
    pacer, counter = Pacer(rate), itertools.count()
    try:
        while not stop.is_set():
            i = next(counter)
            name, frame = [
                (
                    f"subscribe_{topic_bytes}B_topics",
                    b"\x01" + i.to_bytes(8, "little") + _junk(rng, topic_bytes),
                ),
                ("garbage_frame", b"\x07" + _junk(rng, 16)),
                ("cancel_never_subscribed", b"\x00" + _junk(rng, 16)),
            ][i % 3]
            try:
                sock.send(frame, zmq.NOBLOCK)
                attack.sent[name] += 1
            except zmq.Again:
                attack.not_taken += 1
            pacer.wait()
    finally:
        sock.close(linger=0)


@contextlib.contextmanager
def slow_subscribers(address: str, n: int, attack: Attack) -> Iterator[list[zmq.Socket]]:
    """n SUB sockets subscribed to everything that never read (each costs its PUB up to SNDHWM messages)."""
    socks = []
    try:
        for _ in range(n):
            sock = _socket(zmq.SUB, address)
            sock.rcvhwm = 0  # unbounded here: the PUB's queue, not ours, is what fills
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            socks.append(sock)
        attack.sent["slow_subscribers"] += n
        yield socks
    finally:
        for sock in socks:
            sock.close(linger=0)


# ------------------------------------------------------------------------------------------- the page
def page_attack(attack: Attack, stop: threading.Event, rate: float, port: int, token: str) -> None:
    """HTTP against the page: a rebinding Host (400), no token, a wrong one, a non-ASCII one (401), a
    cross-site WebSocket handshake (403), unknown paths and oversized image requests."""
    base = f"http://127.0.0.1:{port}"
    pacer, counter = Pacer(rate), itertools.count()
    ws_headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
    requests = [
        ("rebinding_host", "/api/state", {"Host": "rebind.attacker.example"}),
        ("no_token", "/api/state", {}),
        ("wrong_token", "/api/state?token=wrong", {}),
        ("non_ascii_token", "/api/state?token=%C3%A9%FF", {}),
        ("bad_cookie", "/api/state", {"Cookie": "stemstream_live=\x7f; ;;="}),
        ("cross_site_websocket", f"/ws?token={token}", {**ws_headers, "Origin": "https://evil.example"}),
        ("unknown_path_with_token", f"/../../etc/passwd?token={token}", {}),
        ("image_of_unknown_scan", f"/api/scans/{'x' * 200}/bf.json?token={token}", {}),
    ]
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            name, path, headers = requests[next(counter) % len(requests)]
            try:
                status = client.get(base + path, headers=headers).status_code
                attack.sent[name] += 1
                _seen(attack, name, status)
            except httpx.HTTPError as exc:
                attack.notes.append(f"{name}: {type(exc).__name__}")
                attack.not_taken += 1
            pacer.wait()


def _seen(attack: Attack, name: str, status: int) -> None:
    key = f"status {status} for {name}"
    if key not in attack.notes:
        attack.notes.append(key)


def websocket_flood(attack: Attack, port: int, token: str, n: int) -> list:
    """n WebSocket clients with the token that never read: at most live.max_clients are taken, the rest
    refused at the handshake. Returns the open connections (close them when done)."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    opened, refused = [], Counter()
    for _ in range(n):
        try:
            url = f"ws://127.0.0.1:{port}/ws?token={token}"
            opened.append(
                connect(url, open_timeout=10, ping_interval=None)
            )  # no pings: a client that never reads
            attack.sent["websocket_never_reading"] += 1
        except InvalidStatus as exc:
            refused[exc.response.status_code] += 1
            attack.sent["websocket_beyond_max_clients"] += 1
        except (OSError, TimeoutError) as exc:
            refused[type(exc).__name__] += 1
    attack.notes.append(f"websockets: {len(opened)} open, refused {dict(refused)}")
    return opened


def connection_flood(attack: Attack, port: int, n: int) -> list:
    """n TCP connections to the page that send half a request and wait (slowloris): uvicorn's
    limit_concurrency bounds what it serves; the open sockets are returned."""
    import socket

    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        socks.append(s)
    attack.sent["half_open_requests"] += n
    return socks


def close_all(clients: list) -> None:
    """Close WebSocket clients at once (each waits at most its close_timeout for the server's answer)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, len(clients))) as pool:
        list(pool.map(lambda c: c.close(), clients))


def beyond_concurrency(attack: Attack, port: int, n: int) -> dict:
    """n more half-open connections on top of what is held, then one request: its status (503 once
    uvicorn's limit_concurrency is reached); the connections are closed again."""
    socks = connection_flood(attack, port, n)
    try:
        status = httpx.get(f"http://127.0.0.1:{port}/api/state", timeout=10).status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    finally:
        for s in socks:
            s.close()
    attack.notes.append(f"one request with {n} more half-open connections: {status}")
    return {"extra_half_open": n, "status": status}
