"""Audit findings on the control sockets: the scan writer's socket (H1), the aggregator's node control and its
forwarder hub (M3), and the bounded logging of what they drop (L8). Real sockets on loopback, real sessions;
Hypothesis fuzzes the control decoders and the aggregator's and writer's socket loops, after which a real
scan through the pipeline is complete."""

from __future__ import annotations

import contextlib
import threading
import time
import typing
from dataclasses import asdict, fields
from pathlib import Path

import msgpack
import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from counting.geometry import ScanShape
from counting.kernel import Thresholds
from counting.settings import CountingSettings
from counting.simulator import SimulatorConfig
from streaming.aggregator.aggregator import Aggregator
from streaming.components import writer_config
from streaming.protocol import control as p
from streaming.protocol import paths as f
from streaming.settings import CurveSettings, StreamingSettings
from streaming.transport.security import generate_keypair, peer_curve, write_keypair
from streaming.writer.writer import ScanWriter
from tests.streaming.harness import Session, start_session

pytestmark = pytest.mark.timeout(180)
FIXED = Thresholds(30.5, 600.0)
SCAN = SimulatorConfig(ScanShape(8, 6), dose=100.0, seed=11)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

CONTROL_TYPES = [cls for cls in p._KIND if cls is not p.AggregatorState] + [p.AggregatorState]
PATH_TYPES = list(f._KIND)


# ------------------------------------------------------------------------------------------- helpers
def dealer(endpoint: str, curve: object | None = None) -> zmq.Socket:
    """A DEALER on the shared context, connected (CURVE client when given)."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    if curve is not None:
        from streaming.transport.security import apply_client

        apply_client(s, curve)
    s.connect(endpoint)
    return s


def wait_for(predicate: typing.Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll predicate until true or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def writer(tmp_path: Path, curve: object | None = None) -> ScanWriter:
    """A scan writer on loopback, fixed thresholds."""
    cfg = writer_config(
        StreamingSettings(), CountingSettings(background_threshold=30.5, xray_threshold=600.0), tmp_path
    )
    return ScanWriter("tcp://127.0.0.1:0", cfg, None, curve=curve).start()


def begin_body(**changes: object) -> bytes:
    """A w.begin body, with some fields changed."""
    body = dict(name="x", scan_number=1, scan_width=8, scan_height=8, n_nodes=1, node_index=0)
    body.update(changes)
    return msgpack.packb(body)


def hosted_writer(session: Session) -> ScanWriter:
    """The scan writer of the session (hosted by whichever node joined first)."""
    return next(n.hosted._writer for n in session.nodes if n.hosted._writer is not None)


def real_scan_is_complete(session: Session, scan_number: int) -> None:
    """Send a simulated scan through the session; its file is complete."""
    session.send(SCAN, scan_number=scan_number)
    counted = session.counted(scan_number)
    assert counted.completeness == 1.0


# ---------------------------------------------------------------------- strategies from the annotations
def _strategy(hint: object) -> st.SearchStrategy:
    """Valid values of an annotated field type (with its msgspec.Meta range)."""
    meta = None
    if typing.get_origin(hint) is typing.Annotated:
        hint, *extra = typing.get_args(hint)
        meta = next((m for m in extra if isinstance(m, msgspec.Meta)), None)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    lo = getattr(meta, "ge", None)
    hi = getattr(meta, "le", None)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(-(2**40) if lo is None else lo, 2**40 if hi is None else hi)
    if hint is float:
        return st.floats(allow_nan=False)
    if hint is str:
        return st.text(max_size=20 if meta is None or meta.max_length is None else min(20, meta.max_length))
    if hint is bytes:
        return st.binary(max_size=20)
    if hint is dict or origin is dict:
        k, v = args or (str, int)
        return st.dictionaries(_strategy(k), _strategy(v), max_size=3)
    if origin is list:
        inner = _strategy(args[0])
        n_min = getattr(meta, "min_length", None) or 0
        n_max = getattr(meta, "max_length", None)
        return st.lists(inner, min_size=n_min, max_size=min(4, n_max) if n_max is not None else 4)
    if hint is typing.Any:
        return st.one_of(st.integers(0, 100), st.text(max_size=5))
    raise AssertionError(f"no strategy for {hint!r}")


def valid(cls: type) -> st.SearchStrategy:
    """Valid messages of one class, from its annotations."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return st.builds(cls, **{x.name: _strategy(hints[x.name]) for x in fields(cls)})


any_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def hostile_body(draw: st.DrawFn, cls: type) -> dict:
    """A body with the class's field names (some of them) and arbitrary values, sometimes an extra field."""
    names = [x.name for x in fields(cls)]
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    body = {name: draw(any_value) for name in chosen}
    if draw(st.booleans()):
        body.update(draw(st.dictionaries(st.text(max_size=5), any_value, max_size=2)))
    return body


def _packable(value: object) -> bytes | None:
    try:
        return msgpack.packb(value)
    except (OverflowError, ValueError, TypeError):
        return None


# ------------------------------------------------------------------------------------------ decoders
@FUZZ
@given(st.sampled_from(CONTROL_TYPES).flatmap(valid))
def test_control_round_trip_encoded_as_before_decodes_to_the_same_message(message: object) -> None:
    """The wire is unchanged: the encoder (untouched) gives the same msgpack map as before, and the strict
    decoder returns the same message."""
    kind, body = p.encode(message)
    assert body == msgpack.packb(asdict(message))  # the pre-change encoding, byte for byte
    assert p.decode(kind, body) == message
    assert type(message)(**msgpack.unpackb(body, strict_map_key=False)) == message  # the old decoder agrees


@FUZZ
@given(st.sampled_from(PATH_TYPES).flatmap(valid))
def test_forwarder_round_trip(message: object) -> None:
    """Forwarder <-> hub messages: same bytes, same message back."""
    parts = f.encode(message)
    assert parts[1] == msgpack.packb(asdict(message))
    assert f.decode(parts) == message
    assert type(message)(**msgpack.unpackb(parts[1], strict_map_key=False)) == message


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CONTROL_TYPES).flatmap(lambda cls: st.tuples(st.just(cls), hostile_body(cls))))
def test_control_decoder_gives_a_typed_message_or_protocol_error(case: tuple[type, dict]) -> None:
    """Arbitrary values under the right field names: a message whose every field has its type, or a
    ProtocolError; never another exception."""
    cls, body = case
    raw = _packable(body)
    if raw is None:
        return
    try:
        message = p.decode(p._KIND[cls], raw)
    except p.ProtocolError:
        return
    assert type(message) is cls
    msgspec.convert(asdict(message), cls)  # every field has its annotated type and range


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(list(p._TYPE) + [b"nope"]), any_value | st.binary(max_size=40).map(lambda b: ("raw", b))
)
def test_control_decoder_on_any_body(kind: bytes, value: object) -> None:
    """Any msgpack value or any bytes as a body: a message or ProtocolError."""
    raw = value[1] if isinstance(value, tuple) else _packable(value)
    if raw is None:
        return
    with contextlib.suppress(p.ProtocolError):
        p.decode(kind, raw)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(PATH_TYPES).flatmap(lambda cls: st.tuples(st.just(cls), hostile_body(cls))))
def test_forwarder_decoder_gives_a_typed_message_or_protocol_error(case: tuple[type, dict]) -> None:
    """The same for the hub's messages."""
    cls, body = case
    raw = _packable(body)
    if raw is None:
        return
    try:
        message = f.decode([f._KIND[cls], raw])
    except p.ProtocolError:
        return
    assert type(message) is cls


def test_mistyped_fields_are_refused() -> None:
    """The audit's examples: a string for an int, a list for a name, a bool for an int."""
    for kind, body in [
        (p.W_BEGIN, begin_body(scan_width="8")),
        (p.W_BEGIN, begin_body(n_nodes=0)),
        (p.W_BEGIN, begin_body(scan_width=70000)),
        (p.HELLO, msgpack.packb({"name": [1], "pid": 1})),
        (p.W_SAMPLES, msgpack.packb({"name": "a", "scan_number": 1, "frame_numbers": [], "last": 1})),
        (p.W_DONE, msgpack.packb({**asdict(p.NodeScanDone("a", 1, 1, 1, 1, 0, 0, "complete")), "name": [1]})),
    ]:
        with pytest.raises(p.ProtocolError):
            p.decode(kind, body)
    with pytest.raises(p.ProtocolError):
        f.decode([b"f.progress", msgpack.packb({"index": 1, "received": "x"})])


# ------------------------------------------------------------------------------------------ H1: writer
def test_mistyped_begin_does_not_kill_the_writer(tmp_path: Path) -> None:
    """H1 repro: a w.begin with a string width is counted as malformed; the writer serves on."""
    w = writer(tmp_path)
    s = dealer(w.endpoint)
    try:
        s.send_multipart([p.W_BEGIN, begin_body(scan_width="8")])
        s.send_multipart([p.W_SAMPLES])  # too few parts
        s.send_multipart([p.W_EVENTS, begin_body(), b"1"])  # the wrong header for its kind
        assert wait_for(lambda: w.malformed == 3)
        assert w._thread.is_alive() and w.error is None
        s.send_multipart([p.W_BEGIN, begin_body(scan_number=2)])
        assert wait_for(lambda: len(w._scans) == 1)  # still serving
    finally:
        s.close()
        w.stop(5)


def test_a_dead_writer_thread_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """H1: a bug that ends the writer loop sets ``error`` (and HostedWriter reports a dead thread)."""
    from streaming.node.hosted_writer import HostedWriter

    settings_ = StreamingSettings(writer_bind="tcp://127.0.0.1:0")
    hosted = HostedWriter(
        writer_config(settings_, CountingSettings(background_threshold=30.5, xray_threshold=600.0), tmp_path),
        settings_,
        zmq.Context.instance(),
    )
    hosted.start(None, None, "n0")
    w = hosted._writer
    assert hosted.error is None

    def broken() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(w, "_check_deadlines", broken)
    assert wait_for(lambda: not w._thread.is_alive())
    assert hosted.error is not None and "a bug" in hosted.error
    w.error = None  # the thread is dead either way: HostedWriter says so
    assert hosted.error is not None and "died" in hosted.error
    hosted.stop()


def test_a_plain_dealer_cannot_talk_to_a_curve_writer(tmp_path: Path) -> None:
    """H1: with the nodes' keys the writer is a CURVE server; a plain DEALER and an unknown key get
    nothing through, a node with the keys does."""
    public, secret = generate_keypair()
    from streaming.transport.security import CurveClientConfig

    server, client = peer_curve(CurveClientConfig(public, secret, public))
    w = writer(tmp_path, curve=server)
    stranger_public, stranger_secret = generate_keypair()
    plain = dealer(w.endpoint)
    stranger = dealer(w.endpoint, CurveClientConfig(stranger_public, stranger_secret, public))
    node = dealer(w.endpoint, client)
    try:
        for s in (plain, stranger):
            s.send_multipart([p.W_BEGIN, begin_body(scan_number=5)])
        time.sleep(0.5)
        assert not w._scans and w.malformed == 0
        node.send_multipart([p.W_BEGIN, begin_body(scan_number=6)])
        assert wait_for(lambda: len(w._scans) == 1)
        assert node.poll(5000), "the node gets its scan's thresholds back"
    finally:
        for s in (plain, stranger, node):
            s.close()
        w.stop(5)


def test_a_curve_session_writes_through_the_curve_writer(tmp_path: Path) -> None:
    """H1 end to end: aggregator, two nodes and node 0's writer all on the session's keys; a scan is complete
    and the writer refuses a plain connection."""
    keys = tmp_path / "keys"
    _, server_secret = write_keypair(keys, "aggregator")
    nodes_public, nodes_secret = write_keypair(keys, "nodes")
    agg_curve = CurveSettings(server_secret_file=server_secret, allowed_clients=[nodes_public])
    node_curve = CurveSettings(client_secret_file=nodes_secret, server_public_file=keys / "aggregator.key")
    session = start_session(
        tmp_path, 2, fixed=FIXED, node_overrides={"curve": node_curve}, agg_overrides={"curve": agg_curve}
    )
    try:
        w = hosted_writer(session)
        assert w._auth is not None
        plain = dealer(w.endpoint)
        plain.send_multipart([p.W_BEGIN, begin_body(scan_number=90)])
        real_scan_is_complete(session, 9)
        time.sleep(0.2)
        assert w.malformed == 0 and all(s.begin.scan_number != 90 for s in w._scans.values())
        plain.close()
    finally:
        session.close()


# ---------------------------------------------------------------------------------- M3: aggregator
def test_a_mistyped_hello_does_not_stop_the_aggregator() -> None:
    """M3 repro: hello with a list name (and other garbage) is dropped; the aggregator runs on."""
    agg = Aggregator(
        StreamingSettings(receivers=["tcp://127.0.0.1:0"], nodes_bind="tcp://127.0.0.1:0", monitor_bind=None)
    )
    t = threading.Thread(target=agg.run, kwargs={"timeout": 10}, daemon=True)
    t.start()
    s = dealer(agg.nodes_endpoint)
    try:
        s.send_multipart([p.HELLO, msgpack.packb({"name": [1], "pid": 1})])
        s.send_multipart([p.HELLO, b"\xc1"])
        s.send_multipart([p.READY])
        assert wait_for(lambda: agg.control.malformed == 3)
        assert t.is_alive()
        s.send_multipart(p.encode(p.Hello("n0", 1)))  # a real hello is still answered
        assert s.poll(5000)
        kind, body = s.recv_multipart()
        assert p.decode(kind, body) == p.decode(*p.encode(p.Welcome(0, 1, agg.session_id, True, "")))
    finally:
        s.close()
        agg._stopping = True
        t.join(10)


def test_a_known_name_from_a_new_connection_cannot_take_over(tmp_path: Path) -> None:
    """M3: the writer host's name from another connection is refused (hello, WriterAt, ready); the writer
    address and the routes stay; the next real scan is complete."""
    session = start_session(tmp_path, 2, fixed=FIXED)
    agg = session.aggregator
    try:
        host, address = agg.nodes.writer.name, agg.nodes.writer.address
        identity = agg.nodes.by_name[host].identity
        s = dealer(agg.nodes_endpoint)
        s.send_multipart(p.encode(p.WriterAt(host, "tcp://evil:1", "")))
        s.send_multipart(p.encode(p.Ready(host)))
        s.send_multipart(p.encode(p.Hello(host, 1, output_dir=str(session.output_dir))))
        assert s.poll(5000)
        bye = p.decode(*s.recv_multipart())
        assert isinstance(bye, p.Bye) and not bye.final and "connected already" in bye.reason
        s.send_multipart(p.encode(p.WriterAt(host, "tcp://evil:1", "")))
        assert wait_for(lambda: agg.control.refused >= 4)
        assert agg.nodes.writer.address == address
        assert agg.nodes.by_name[host].identity == identity
        s.close()
        real_scan_is_complete(session, 12)
    finally:
        session.close()


def test_a_strangers_progress_on_the_hub_is_dropped(tmp_path: Path) -> None:
    """M3: with a forwarding process, a local DEALER on the hub (loopback) is refused: its Progress (mistyped
    or well-formed) is neither merged nor fatal; a node's name cannot be attached on the forwarder from
    another connection; the next real scan is complete."""
    session = start_session(tmp_path, 1, fixed=FIXED, agg_overrides={"aggregator_processes": 2})
    agg = session.aggregator
    try:
        hub = agg.hub
        s = dealer(hub.socket.getsockopt(zmq.LAST_ENDPOINT).decode())
        received = agg.stats.received
        s.send_multipart([b"f.progress", msgpack.packb({"index": 1, "received": "x"})])
        s.send_multipart(f.encode(f.Progress(index=1, received=10**6)))
        s.send_multipart(f.encode(f.Up(index=1, receivers=[], nodes="tcp://evil:1", pid=1)))
        assert wait_for(lambda: hub.refused >= 3)
        assert agg.stats.received == received
        assert session.threads[0].is_alive()
        s.close()
        # The forwarder's node socket: node0's name from another connection gets no answer (not attached).
        taker = dealer(hub.forwarders[1].nodes.replace("0.0.0.0", "127.0.0.1"))
        taker.send_multipart(p.encode(p.Attach(name="node0")))
        taker.send_multipart(p.encode(p.Attach(name="stranger")))  # a name nobody has: answered
        assert taker.poll(5000)
        assert p.decode(*taker.recv_multipart()) == p.Attach(name="stranger", path=1)
        assert not taker.poll(500)
        taker.close()
        real_scan_is_complete(session, 13)
    finally:
        session.close()


# ------------------------------------------------------------------------------------- socket fuzzing
def _hostile_messages(types: list[type]) -> st.SearchStrategy:
    """Lists of multipart messages: known kinds with hostile bodies, garbage kinds, too many or few parts."""
    one = st.one_of(
        st.sampled_from(types).flatmap(
            lambda cls: hostile_body(cls).map(lambda b, cls=cls: [p._KIND.get(cls) or f._KIND[cls], b])
        ),
        st.lists(st.binary(max_size=12), min_size=0, max_size=4).map(lambda parts: [b"junk", *parts]),
    )
    return st.lists(one, min_size=1, max_size=8)


def _send_all(sock: zmq.Socket, messages: list[list]) -> int:
    sent = 0
    for kind, *rest in messages:
        body = [x if isinstance(x, bytes) else _packable(x) for x in rest]
        if any(b is None for b in body):
            continue
        sock.send_multipart([kind, *body])
        sent += 1
    return sent


def test_fuzzed_control_messages_never_stop_the_aggregator(tmp_path: Path) -> None:
    """N fuzzed messages on the aggregator's node socket (from a connection that never said a real hello,
    and with hellos of random names refused for want of slots); then a real scan is complete."""
    session = start_session(tmp_path, 2, fixed=FIXED)
    agg = session.aggregator
    s = dealer(agg.nodes_endpoint)
    total = [0]
    try:

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        @given(_hostile_messages(CONTROL_TYPES))
        def fuzz(messages: list[list]) -> None:
            total[0] += _send_all(s, messages)

        fuzz()
        time.sleep(0.5)
        assert session.threads[0].is_alive()
        assert agg.control.malformed + agg.control.refused > 0
        assert agg.state().nodes_connected == 2
        real_scan_is_complete(session, 21)
    finally:
        s.close()
        session.close()
    assert total[0] > 0


def test_fuzzed_writer_messages_never_stop_the_writer(tmp_path: Path) -> None:
    """N fuzzed messages on node 0's writer socket; the writer serves on and the next real scan is complete."""
    session = start_session(tmp_path, 2, fixed=FIXED, node_overrides={"max_scan_positions": 4096})
    w = hosted_writer(session)
    s = dealer(w.endpoint)
    writer_types = [p.NodeScanBegin, p.SampleHeader, p.EventsHeader, p.NodeScanDone]
    try:

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        @given(_hostile_messages(writer_types))
        def fuzz(messages: list[list]) -> None:
            _send_all(s, messages)

        fuzz()
        time.sleep(0.5)
        assert w._thread.is_alive() and w.error is None and w.malformed > 0
        real_scan_is_complete(session, 22)
    finally:
        s.close()
        session.close()
