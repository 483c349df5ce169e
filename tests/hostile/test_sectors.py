"""Audit findings on the sector path (H2, M7): a scan's size from the wire is bounded by
streaming.max_scan_positions, one stray sector never ends the open scan, thread accounting is linear, and
the decoder and the aggregator's receiver loop take anything. Real sockets on loopback; after the hostile
input a real scan through the pipeline (aggregator, node streamers, writer) is complete."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from counting.geometry import N_SECTORS, SECTOR_BYTES, ScanShape
from counting.kernel import Thresholds
from counting.simulator import SimulatorConfig
from streaming.aggregator.open_scan import OpenScan
from streaming.node.scan import check_shape
from streaming.protocol import control as p
from streaming.protocol.sector import SectorHeader, WireError, decode_header, decode_message
from tests.streaming.harness import Session, start_session
from tests.streaming.test_aggregator import (
    SMALL,
    ended,
    joined,
    results,
    send,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)
FIXED = Thresholds(30.5, 600.0)
SCAN = SimulatorConfig(ScanShape(8, 6), dose=100.0, seed=11)
HUGE = [7, 0, 0, 65535, 65535, 0, 0, 0, 0]  # the audit's header: 4.29e9 positions
EXAMPLES = {"decoder": 300, "loop": 60}  # Hypothesis examples per fuzz test (reported)

# msgpack values of every kind (ints within msgpack's range), for the decoder fuzzing
_INTS = st.integers(-(2**63), 2**64 - 1)
_SCALARS = st.none() | st.booleans() | _INTS | st.floats() | st.text(max_size=8) | st.binary(max_size=8)
MSGPACK = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=10) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=20,
)
# nine ints near and beyond every field's range: the headers a confused receiver might send
HEADER_LIKE = st.lists(
    st.integers(-3, 2**33) | st.sampled_from([0, 1, 3, 64, 65535, 65536]), min_size=9, max_size=9
)


# ------------------------------------------------------------------------------------------- helpers
def pusher(endpoint: str) -> zmq.Socket:
    """A PUSH on the shared context, connected to a receiver port."""
    s = zmq.Context.instance().socket(zmq.PUSH)
    s.linger = 0
    s.connect(endpoint)
    return s


def sector(fields: list[int]) -> list[bytes]:
    """A 2-part sector message with this header and a zero payload."""
    return [msgpack.packb(fields), bytes(SECTOR_BYTES)]


def real_scan_is_complete(session: Session, scan_number: int) -> None:
    """Send a simulated scan through the session; its file is complete."""
    session.send(SCAN, scan_number=scan_number)
    assert session.counted(scan_number).completeness == 1.0


# ----------------------------------------------------------------------------------------- H2: bounds
def test_an_oversize_scan_is_refused_counted_and_nothing_is_allocated(tmp_path: Path) -> None:
    """The audit's 65535x65535 header to a receiver port: refused and counted (refused, refused_scans),
    no scan begins at the aggregator or any node, memory stays flat; the next real scan is complete."""
    session = start_session(tmp_path, 2, fixed=FIXED)
    agg = session.aggregator
    s = pusher(agg.receiver_endpoints[0])
    try:
        assert wait_for(lambda: agg.state().nodes_ready == 2)
        tracemalloc.start()
        try:
            for module in range(N_SECTORS):
                s.send_multipart(sector([*HUGE[:8], module]))
            assert wait_for(lambda: agg.stats.refused == N_SECTORS)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 << 20, f"{peak} bytes traced for a refused scan"  # 65535^2 would be ~34 GB
        assert agg.stats.scans == 0 and agg.state().refused_scans == {7: N_SECTORS}
        assert all(n._scan is None for n in session.nodes)  # no node was told to begin it
        real_scan_is_complete(session, 8)
        assert agg.stats.refused == N_SECTORS and agg.stats.malformed == 0
    finally:
        s.close()
        session.close()


def test_the_node_refuses_an_oversize_scan_begin() -> None:
    """A node's scan begin above the setting is a ProtocolError (counted malformed by its control loop)
    before the node allocates anything for it."""
    begin = p.ScanBegin(
        scan_number=7, scan_width=65535, scan_height=65535, expected_frames=0, node_index=0, n_nodes=1
    )
    with pytest.raises(p.ProtocolError, match="max_scan_positions"):
        check_shape(begin, 4096 * 4096)
    check_shape(p.ScanBegin(7, 4096, 4096, 0, 0, 1), 4096 * 4096)  # at the limit: fine


def test_a_smaller_limit_is_the_one_enforced(start_aggregator, make_node, pool) -> None:
    """streaming.max_scan_positions set below a scan's size: the whole scan is refused and counted."""
    agg = start_aggregator(1, max_scan_positions=SMALL.scan.positions - 1)
    node = make_node(agg.nodes_endpoint, "a")
    joined([node])
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=5))
    assert wait_for(lambda: agg.stats.refused == N_SECTORS * SMALL.total_frames)
    assert not node.got.begins and not node.got.data and agg.state().refused_scans == {5: 4 * 64}


# ------------------------------------------------------------------------------------ M7: stray sectors
def test_one_stray_sector_does_not_truncate_the_open_scan(start_aggregator, make_node, pool) -> None:
    """One sector of scan 41 while scan 40 streams: 40 still completes with every sector; the stray
    number begins only after it (and is superseded by the next real scan, which completes)."""
    agg = start_aggregator(2, scan_deadline=10.0)  # long: nothing here ends by its deadline
    nodes = [make_node(agg.nodes_endpoint, n) for n in ("a", "b")]
    joined(nodes)
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=40, modules=[0, 1, 2]))
    assert wait_for(lambda: agg.stats.received == 3 * SMALL.total_frames)
    s = pusher(agg.receiver_endpoints[0])
    try:
        s.send_multipart(sector([41, 0, 0, 8, 8, 0, 0, 0, 0]))  # the stray
        time.sleep(0.3)
        assert agg.state().scan_number == 40  # still open
        results(send(pool, SMALL, agg.receiver_endpoints, scan_number=40, modules=[3]))
        ended(nodes)
        for node in nodes:
            assert [(e.scan_number, e.reason) for e in node.got.ends][:1] == [(40, "complete")]
        got = [h for n in nodes for h, _ in n.got.data if h.scan_number == 40]
        assert len(got) == N_SECTORS * SMALL.total_frames and agg.stats.late == 0
        # The next real scan supersedes whatever the stray began, and is complete.
        results(send(pool, SMALL, agg.receiver_endpoints, scan_number=42))
        assert wait_for(lambda: all(any(e.scan_number == 42 for e in n.got.ends) for n in nodes), 20)
        for node in nodes:
            assert [e.reason for e in node.got.ends if e.scan_number == 42] == ["complete"]
        assert (
            sum(h.scan_number == 42 for n in nodes for h, _ in n.got.data) == N_SECTORS * SMALL.total_frames
        )
    finally:
        s.close()


def test_a_quiet_open_scan_is_superseded_at_once(start_aggregator, make_node, pool) -> None:
    """An open scan without a sector for scan_deadline/4 is superseded by the first sector of a newer one
    (today's behaviour for a scan that lost sectors), and the newer scan is complete."""
    agg = start_aggregator(1, scan_deadline=2.0)
    node = make_node(agg.nodes_endpoint, "a")
    joined([node])
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=50, modules=[0, 1, 2]))
    time.sleep(0.7)  # quiet for more than 2.0 / 4 s
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=51))
    ended([node], scans=2)
    assert [(e.scan_number, e.reason) for e in node.got.ends] == [(50, "superseded"), (51, "complete")]


def test_twenty_thousand_thread_ids_cost_linear_time() -> None:
    """The audit's repro: 20,000 distinct (module, thread) ids. Counted in operations, not seconds: no
    pass over the known threads per new one (the quadratic recount)."""

    class CountingDict(dict):
        passes = 0

        def __iter__(self):  # every pass over the threads goes through one of these
            CountingDict.passes += 1
            return super().__iter__()

        def items(self):
            CountingDict.passes += 1
            return super().items()

        def keys(self):
            CountingDict.passes += 1
            return super().keys()

        def values(self):
            CountingDict.passes += 1
            return super().values()

    n = 20_000
    scan = OpenScan(SectorHeader(1, 0, 1, 64, 64, 0, 0, 0, 0), 1, 0.0, "k")
    scan.threads = CountingDict()
    for tid in range(n):
        scan.add(SectorHeader(1, tid, 1, 64, 64, 0, 0, tid, tid % N_SECTORS))
        scan.sectors_expected  # noqa: B018 (asked per sector, as the monitor state does)
    assert CountingDict.passes == 0 and scan.sectors_expected == n
    assert scan.module_expected == [n // N_SECTORS] * N_SECTORS and scan.complete
    scan.merge(0, [0] * N_SECTORS, [[0, n + 1, 7]])  # a forwarder's thread: also counted incrementally
    assert CountingDict.passes == 0 and scan.module_expected[0] == n // N_SECTORS + 7 and not scan.complete


# ------------------------------------------------------------------------------------------ fuzzing
@settings(max_examples=EXAMPLES["decoder"], deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(MSGPACK.map(msgpack.packb), HEADER_LIKE.map(msgpack.packb), st.binary(max_size=64)))
def test_fuzzed_headers_decode_or_raise_wire_error(raw: bytes) -> None:
    """Any bytes, any msgpack: a SectorHeader within every range and the limit, or WireError."""
    try:
        header = decode_header(raw)
    except WireError:
        return
    assert type(header) is SectorHeader
    assert 0 <= header.x < header.scan_width and 0 <= header.y < header.scan_height
    assert 0 <= header.module < N_SECTORS


@settings(max_examples=EXAMPLES["decoder"], deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(st.binary(max_size=32), HEADER_LIKE.map(msgpack.packb)), max_size=4))
def test_fuzzed_messages_decode_or_raise_wire_error(parts: list[bytes]) -> None:
    """Any number of parts: a (header, payload) with a whole sector payload, or WireError."""
    try:
        header, payload = decode_message(parts)
    except WireError:
        return
    assert type(header) is SectorHeader and payload.nbytes == SECTOR_BYTES


def _hostile_sectors() -> st.SearchStrategy[list[list[bytes]]]:
    """Lists of messages for a receiver port: garbage, wrong part counts, headers of every shape (scan
    numbers below 1000: the real scan after them is 1000), with and without a whole payload."""
    header = st.one_of(
        HEADER_LIKE.map(lambda h: msgpack.packb([h[0] % 1000, *h[1:]])),
        MSGPACK.map(msgpack.packb),
        st.binary(max_size=32),
    )
    payload = st.sampled_from([b"", b"x", bytes(SECTOR_BYTES), bytes(SECTOR_BYTES + 1)])
    message = st.one_of(st.tuples(header, payload).map(list), st.lists(st.binary(max_size=16), max_size=3))
    return st.lists(message.filter(bool), min_size=1, max_size=8)


def test_fuzzed_sectors_never_stop_the_pipeline(tmp_path: Path) -> None:
    """Hypothesis-made messages on a receiver port of a real session: every one is forwarded, refused,
    dropped or counted; the aggregator and the nodes serve on, and the next real scan is complete."""
    session = start_session(tmp_path, 2, fixed=FIXED, scan_deadline=0.5)
    agg = session.aggregator
    s = pusher(agg.receiver_endpoints[0])
    sent = [0]
    try:

        @settings(max_examples=EXAMPLES["loop"], deadline=None, suppress_health_check=list(HealthCheck))
        @given(_hostile_sectors())
        def fuzz(messages: list[list[bytes]]) -> None:
            for message in messages:
                s.send_multipart(message)
                sent[0] += 1

        fuzz()
        assert wait_for(lambda: agg.stats.received + agg.stats.malformed + agg.stats.refused >= sent[0] // 2)
        assert all(t.is_alive() for t in session.threads)
        time.sleep(1.0)  # whatever the fuzzing began ends by its (short) deadline
        assert wait_for(lambda: agg.state().nodes_ready == 2, 15)
        real_scan_is_complete(session, 1000)
        assert agg.stats.malformed > 0 and all(t.is_alive() for t in session.threads)
    finally:
        s.close()
        session.close()


def test_no_thread_of_the_aggregator_dies_on_oversize_input_from_a_forwarder_path(tmp_path: Path) -> None:
    """With a forwarding process (K=2), the oversize scan is refused on either path and counted; the
    next real scan is complete."""
    session = start_session(tmp_path, 1, fixed=FIXED, agg_overrides={"aggregator_processes": 2})
    agg = session.aggregator
    sockets = [pusher(e) for e in agg.receiver_endpoints[0].split(",")]  # path 0 and the forwarder
    assert len(sockets) == 2
    try:
        assert wait_for(lambda: agg.state().nodes_ready == 1, 20)
        for s in sockets:
            for module in range(N_SECTORS):
                s.send_multipart(sector([*HUGE[:8], module]))
        assert wait_for(lambda: agg.state().refused >= N_SECTORS, 20)
        assert agg.stats.scans == 0
        real_scan_is_complete(session, 9)
    finally:
        for s in sockets:
            s.close()
        session.close()
