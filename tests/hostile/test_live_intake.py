"""Audit findings on the live view's intake (M2, L5, L7, and H2's view side): the live decoder refuses
anything malformed with LiveWireError, the intake thread survives every message, ViewState bounds what it
allocates and checks what it keeps, only a valid geometry is agreed and relayed, and foreign HDF5 files are
not re-opened every second. Real sockets on loopback; Hypothesis fuzzes the decoder, ViewState and the
intake loop, after which a real snapshot still goes through."""

from __future__ import annotations

import math
import time
import typing
from collections.abc import Iterator
from pathlib import Path

import h5py
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from counting.live_images import LiveGeometry, LiveImages
from streaming.protocol import live as live_wire
from streaming.view import ingest as ingest_module
from streaming.view.app import _state
from streaming.view.ingest import LiveIngest
from streaming.view.state import ViewState

pytestmark = pytest.mark.timeout(120)
EXAMPLES = {"decoder": 150, "state": 200, "loop": 60}  # Hypothesis examples per fuzz test (reported)
GEOMETRY = {"cx": 288.0, "cy": 288.0, "bf_radius": 100.0, "adf_inner": 120.0, "adf_outer": 250.0}


def header(**changes: object) -> dict:
    """A valid snapshot header (scan k3, 3x2, node a), with some fields changed."""
    h = {
        "node": "a", "node_index": 0, "n_nodes": 2, "scan_number": 3, "scan_key": "k3", "width": 3,
        "height": 2, "expected_frames": 6, "seq": 1, "final": False, "frames": 3, "sectors": 11,
        "events": 9, "geometry": dict(GEOMETRY), "dropped_batches": 0, "dropped_snapshots": 0,
        "counted_at": 1.0, "oldest_at": 1.0, "lo": 0, "hi": 6,
    }  # fmt: skip
    h.update(changes)
    return h


def arrays(n: int = 6, value: int = 2) -> dict[str, np.ndarray]:
    """The arrays of a snapshot of n positions."""
    out = {k: np.full(n, value, np.int64) for k in ("counts", "bf", "adf", "sum_col", "sum_row")}
    out["frames"] = np.full(n, 1, np.int32)
    out["pattern"] = np.full(576 * 576, value, np.uint32)
    return out


def snapshot(**changes: object) -> list:
    """A valid live.snap message."""
    h = header(**changes)
    return live_wire.encode(live_wire.SNAP, h, arrays(h["hi"] - h["lo"]))


def wait_for(predicate: typing.Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll predicate until true or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[LiveIngest]:
    """A running intake on loopback, looking at tmp_path for scan files."""
    ingest = LiveIngest(ViewState(), "tcp://127.0.0.1:0", scan_dir=tmp_path).start()
    try:
        yield ingest
    finally:
        ingest.close()


def dealer(address: str) -> zmq.Socket:
    """A DEALER (as a node's live publisher), connected."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(address)
    return s


# --------------------------------------------------------------------------------------- M2: decoder
@pytest.mark.parametrize("value", [1, [1, 2], "x", None, b"raw", 1.5])
def test_decode_refuses_a_non_map_header(value: object) -> None:
    with pytest.raises(live_wire.LiveWireError):
        live_wire.decode([live_wire.SNAP, msgpack.packb(value)])


@pytest.mark.parametrize(
    "listed",
    [
        "not a list",
        [["pattern", "V8", 1]],  # a dtype not allowed
        [["x", ">i8", 1]],  # big-endian
        [["x", "<i8", -1]],
        [["x", "<i8"]],
        [[1, "<i8", 1]],
        [["x", "(100000000000,)f8", 1]],
    ],
)
def test_decode_refuses_bad_array_lists(listed: object) -> None:
    with pytest.raises(live_wire.LiveWireError):
        live_wire.decode([live_wire.SNAP, msgpack.packb({"arrays": listed}), bytes(8)])


# ------------------------------------------------------------------------------------ M2/H2: ViewState
@pytest.mark.parametrize(
    "changes",
    [
        {"width": float("inf")},  # was OverflowError
        {"width": 10**6, "height": 10**6, "hi": 0},  # was MemoryError (44 B x 1e12)
        {"width": 4097, "height": 4096, "hi": 0},  # above max_scan_positions
        {"width": True},
        {"width": "3"},
        {"lo": 5, "hi": 2},
        {"n_nodes": 10**6},
        {"counted_at": float("nan")},
        {"oldest_at": float("inf")},
        {"node": ["a"]},
        {"scan_key": "k" * 1000},
        {"frames": -1},
    ],
)
def test_view_state_refuses_bad_headers_before_allocating(changes: dict) -> None:
    state = ViewState()
    h = header(**changes)
    n = h["hi"] - h["lo"] if all(type(h[k]) is int for k in ("lo", "hi")) and h["hi"] >= h["lo"] else 6
    with pytest.raises(ValueError):
        state.apply(h, arrays(n))
    assert state.scans() == []


def test_view_state_allow_lists_dtypes_and_lengths() -> None:
    state = ViewState()
    cheap = arrays()
    cheap["bf"] = np.full(6, 255, np.uint8)  # fills whole ranges cheaply: refused
    with pytest.raises(ValueError, match="bf"):
        state.apply(header(), cheap)
    nan = arrays()
    nan["counts"] = np.full(6, np.nan)
    with pytest.raises(ValueError, match="counts"):
        state.apply(header(), nan)
    short = arrays()
    short["frames"] = short["frames"][:3]
    with pytest.raises(ValueError, match="frames"):
        state.apply(header(), short)
    state.apply(header(), arrays())
    assert state.scans()[0]["frames"] == 3


def test_view_state_bounds_node_names_per_scan() -> None:
    """At most n_nodes node names per scan: the 3rd name of a 2-node scan allocates nothing."""
    state = ViewState()
    state.apply(header(node="a"), arrays())
    state.apply(header(node="b"), arrays())
    with pytest.raises(ValueError, match="nodes"):
        state.apply(header(node="c"), arrays())
    with pytest.raises(ValueError):  # another shape for the same scan key
        state.apply(header(node="a", seq=2, width=6, height=1), arrays())
    assert len(state.scan("k3").nodes) == 2


# ------------------------------------------------------------------------------------------ L5: geometry
def test_an_invalid_proposal_is_never_agreed_nor_relayed() -> None:
    """The audit's repro: a proposal with bf_radius -1 is not agreed; a valid one later is."""
    state = ViewState()
    bad = {"cx": 0, "cy": 0, "bf_radius": -1, "adf_inner": 0, "adf_outer": 1}
    assert state.apply(header(node="a", geometry=None, proposal=bad), arrays()) is None
    assert state.apply(header(node="a", seq=2, geometry={"cx": "x"}), arrays()) is None
    assert state.apply(header(node="b", geometry=None, proposal=GEOMETRY), arrays()) == GEOMETRY
    LiveGeometry(**state.scan("k3").agreed)  # what is relayed to every node is valid


def test_live_geometry_refuses_non_finite_values() -> None:
    for bad in (math.inf, math.nan, "1"):
        with pytest.raises(ValueError):
            LiveGeometry(bad, 288.0, 10.0, 12.0, 20.0)


def test_live_images_refuse_an_oversize_scan_before_allocating() -> None:
    with pytest.raises(ValueError, match="positions"):
        LiveImages(65535, 65535)
    with pytest.raises(ValueError):
        LiveImages(0, 5)


# ------------------------------------------------------------------------------------------ intake loop
def test_one_bad_snapshot_does_not_stop_the_intake(intake: LiveIngest) -> None:
    """The audit's repro and more: after each of these the thread lives, the malformed count moves, and a
    valid snapshot is taken (and answered with the agreed geometry when it proposes one)."""
    s = dealer(intake.address)
    bad = [
        [live_wire.SNAP, msgpack.packb(1)],
        [live_wire.SNAP],
        [b"other.kind", msgpack.packb({})],
        live_wire.encode(live_wire.SNAP, header(width=float("inf")), arrays()),
        live_wire.encode(live_wire.SNAP, header(width=10**6, height=10**6, hi=0), arrays(0)),
        live_wire.encode(live_wire.SNAP, {"scan_key": "k"}, {}),
        [live_wire.SNAP, b"\xc1"],
    ]
    try:
        for message in bad:
            s.send_multipart(message)
        assert wait_for(lambda: intake.state.malformed == len(bad))
        assert intake.alive and intake.state.intake() == {"alive": True, "malformed": len(bad)}
        assert _state(intake.state)["intake"] == {"alive": True, "malformed": len(bad)}  # in /api/state
        s.send_multipart(snapshot(geometry=None, proposal=GEOMETRY))
        assert wait_for(lambda: intake.state.scan("k3") is not None)
        assert s.poll(5000)
        kind, answer, _ = live_wire.decode(s.recv_multipart())
        assert kind == live_wire.GEOMETRY and answer == {"scan_key": "k3", "geometry": GEOMETRY}
    finally:
        s.close()


def test_an_oversize_part_is_refused_by_the_socket() -> None:
    """MAXMSGSIZE from max_scan_positions (8 bytes a position, or the pattern, plus 64 kB): a larger part
    never reaches the intake's memory (ZeroMQ drops the connection); other nodes go on."""
    ingest = LiveIngest(ViewState(max_positions=1000), "tcp://127.0.0.1:0").start()
    s, ok = dealer(ingest.address), dealer(ingest.address)
    try:
        limit = ingest.socket.getsockopt(zmq.MAXMSGSIZE)
        assert limit == 4 * 576 * 576 + 64 * 1024  # the pattern part is the largest of so small scans
        s.send_multipart([live_wire.SNAP, msgpack.packb({}), bytes(limit + 1)])
        ok.send_multipart(snapshot())
        assert wait_for(lambda: ingest.state.scan("k3") is not None)
        time.sleep(0.3)
        assert ingest.received == 1 and ingest.state.malformed == 0  # the big one never arrived
    finally:
        s.close()
        ok.close()
        ingest.close()


def test_foreign_files_are_not_reopened_every_second(tmp_path: Path, monkeypatch) -> None:
    """L7: a scan file of no scan of this view is opened once (and again only if it changes); when its
    scan appears later it is named without opening it again."""
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_group("metadata/stemstream").attrs["scan_key"] = "k3"
    opened: list[Path] = []
    real = h5py.File

    def counting(p, *args, **kwargs):
        opened.append(Path(p))
        return real(p, *args, **kwargs)

    monkeypatch.setattr(ingest_module.h5py, "File", counting)
    intake = LiveIngest(ViewState(), "tcp://127.0.0.1:0", scan_dir=tmp_path)  # not started: looks by hand
    try:
        for _ in range(5):
            intake._look()
        assert opened == [path]
        intake.state.apply(header(), arrays())
        intake._look()
        assert opened == [path] and intake.state.scan("k3").file == str(path)
    finally:
        intake.close()


# ------------------------------------------------------------------------------------------ fuzzing
_INTS = st.integers(-(2**63), 2**64 - 1)
_SCALARS = st.none() | st.booleans() | _INTS | st.floats() | st.text(max_size=8) | st.binary(max_size=8)
MSGPACK = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=6),
    max_leaves=20,
)
_DTYPES = st.sampled_from(["<i8", "<i4", "<u4", "|u1", "<f8", "V8", ">i8", "x", 3])
_ENTRY = st.lists(st.one_of(st.text(max_size=8), _DTYPES, st.integers(-2, 10)), min_size=0, max_size=4)


@st.composite
def live_messages(draw: st.DrawFn) -> list[bytes]:
    """A live message: a kind, a header (a map with an arrays list, or anything), raw parts."""
    kind = draw(st.sampled_from([live_wire.SNAP, live_wire.GEOMETRY, b"", b"x" * 30]))
    if draw(st.booleans()):
        h = draw(st.dictionaries(st.text(max_size=6), MSGPACK, max_size=4))
        h["arrays"] = draw(st.one_of(st.lists(_ENTRY, max_size=3), MSGPACK))
        raw_header = msgpack.packb(h)
    else:
        raw_header = draw(st.one_of(MSGPACK.map(msgpack.packb), st.binary(max_size=16)))
    parts = draw(st.lists(st.binary(max_size=24), max_size=3))
    return [kind, raw_header, *parts]


@settings(max_examples=EXAMPLES["decoder"], deadline=None, suppress_health_check=list(HealthCheck))
@given(live_messages())
def test_fuzzed_live_messages_decode_or_raise_live_wire_error(parts: list[bytes]) -> None:
    try:
        kind, h, got = live_wire.decode(parts)
    except live_wire.LiveWireError:
        return
    assert isinstance(h, dict) and isinstance(kind, bytes)
    assert all(a.dtype.str in live_wire.DTYPES for a in got.values())


_FIELD_VALUES = st.one_of(
    st.integers(-3, 10),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=4),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=10), st.floats(), max_size=5),
)


@st.composite
def hostile_snapshots(draw: st.DrawFn) -> tuple[dict, dict[str, np.ndarray]]:
    """A valid snapshot with a few fields replaced by anything, and maybe an array of another kind."""
    h = header()
    for name in draw(st.lists(st.sampled_from([*h, "proposal"]), max_size=4)):
        h[name] = draw(_FIELD_VALUES)
    a = arrays()
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(a)))
        a[name] = np.zeros(
            draw(st.integers(0, 8)), draw(st.sampled_from(["<i8", "<i4", "<u4", "|u1", "<f8"]))
        )
    return h, a


@settings(max_examples=EXAMPLES["state"], deadline=None, suppress_health_check=list(HealthCheck))
@given(hostile_snapshots())
def test_fuzzed_snapshots_are_taken_or_refused_with_value_error(snap: tuple[dict, dict]) -> None:
    """ViewState.apply: a snapshot fits and is kept, or ValueError/KeyError (the intake counts both);
    never an overflow, a memory error or a crash later when the page reads the state."""
    state = ViewState()
    try:
        agreed = state.apply(*snap)
    except (ValueError, KeyError):
        assert state.scans() == []
        return
    assert agreed is None or LiveGeometry(**agreed)
    scan = state.scans()[0]
    assert scan["width"] * scan["height"] <= state.max_positions
    state.image(scan["key"], "bf", masked=True)


def test_fuzzed_messages_never_stop_the_intake(intake: LiveIngest) -> None:
    """Hypothesis-made messages on the intake's socket; the thread lives, and a valid snapshot is then
    taken."""
    s = dealer(intake.address)
    sent = [0]
    try:

        @settings(max_examples=EXAMPLES["loop"], deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            st.lists(
                st.one_of(live_messages(), hostile_snapshots(), hostile_parallax()), min_size=1, max_size=6
            )
        )
        def fuzz(messages: list) -> None:
            for m in messages:
                if isinstance(m, tuple):
                    h, a = m
                    try:
                        m = live_wire.encode(live_wire.SNAP, h, a)
                    except (TypeError, ValueError, OverflowError):
                        continue  # not encodable: nothing to send
                s.send_multipart(m)
                sent[0] += 1

        fuzz()
        assert wait_for(lambda: intake.received + intake.state.malformed >= sent[0], 20)
        assert intake.alive and intake.failures == 0
        s.send_multipart(snapshot(scan_key="after", seq=0))
        assert wait_for(lambda: intake.state.scan("after") is not None)
        assert intake.state.intake()["alive"]
    finally:
        s.close()


# --------------------------------------------------------------------------- the parallax part (live phase)
def parallax_snapshot(**spec_changes: object) -> tuple[dict, dict[str, np.ndarray]]:
    """A valid snapshot with a parallax part (2 x 2 bins over GEOMETRY's disk: 4 kept), spec changed."""
    h = header()
    h["parallax"] = {"n": 2, "inner": 0.85, "bins": 4, "lo": 0, "hi": 6, **spec_changes}
    a = arrays()
    a["parallax"] = np.arange(24, dtype=np.uint16)
    return h, a


def test_a_valid_parallax_part_is_kept_and_summed() -> None:
    state = ViewState()
    state.apply(*parallax_snapshot())
    node = state.scan("k3").nodes["a"].parallax
    assert node.counts.dtype == np.uint32 and node.counts.shape == (6, 4)
    np.testing.assert_array_equal(node.counts.ravel(), np.arange(24))


@pytest.mark.parametrize(
    "spec, array",
    [
        ({"n": 0}, None),
        ({"n": 17}, None),
        ({"n": True}, None),
        ({"inner": float("nan")}, None),
        ({"inner": 1}, None),
        ({"inner": 1.5}, None),
        ({"bins": 5}, None),  # the geometry gives 4
        ({"lo": 4, "hi": 2}, None),
        ({"hi": 7}, None),
        ({}, np.arange(24, dtype=np.int64)),
        ({}, np.arange(24, dtype=np.float64)),
        ({}, np.arange(20, dtype=np.uint16)),
        ({}, np.full(24, 2**40, np.uint64)),
    ],
)
def test_view_state_refuses_bad_parallax_parts(spec: dict, array: np.ndarray | None) -> None:
    h, a = parallax_snapshot(**spec)
    if array is not None:
        a["parallax"] = array
    state = ViewState()
    with pytest.raises(ValueError):
        state.apply(
            *live_wire.decode([bytes(memoryview(x)) for x in live_wire.encode(live_wire.SNAP, h, a)])[1:]
        )
    assert state.scans() == []


def test_parallax_needs_a_geometry_and_its_header() -> None:
    h, a = parallax_snapshot()
    h["geometry"] = None
    with pytest.raises(ValueError):
        ViewState().apply(h, a)
    h, a = parallax_snapshot()
    h["parallax"] = None
    with pytest.raises(ValueError):
        ViewState().apply(h, a)


def test_parallax_of_too_many_positions_x_bins_is_refused_before_allocating() -> None:
    side = 2**11  # 4 bins x 2048^2 = 2**24 cells is the limit: 2049 rows pass it
    h, a = parallax_snapshot(lo=0, hi=0)
    h.update(width=side, height=side + 1, lo=0, hi=0, expected_frames=0)
    for name in ("counts", "bf", "adf", "sum_col", "sum_row", "frames"):
        a[name] = a[name][:0]
    a["parallax"] = a["parallax"][:0]
    with pytest.raises(ValueError, match="do not fit"):
        ViewState().apply(h, a)


@st.composite
def hostile_parallax(draw: st.DrawFn) -> tuple[dict, dict[str, np.ndarray]]:
    """A valid parallax snapshot with a few spec fields replaced by anything, maybe another array."""
    h, a = parallax_snapshot()
    if draw(st.booleans()):
        h["parallax"] = draw(st.one_of(_FIELD_VALUES, st.just(None)))
    for name in draw(st.lists(st.sampled_from(["n", "inner", "bins", "lo", "hi"]), max_size=3)):
        if isinstance(h["parallax"], dict):
            h["parallax"][name] = draw(_FIELD_VALUES)
    if draw(st.booleans()):
        a["parallax"] = np.full(
            draw(st.integers(0, 30)),
            draw(st.integers(0, 2**64 - 1)) % 2 ** draw(st.sampled_from([8, 16, 32, 64])),
            draw(st.sampled_from(["<u2", "<u4", "<u8", "<i8", "<f8", "|u1"])),
        )
    return h, a


@settings(max_examples=EXAMPLES["state"], deadline=None, suppress_health_check=list(HealthCheck))
@given(hostile_parallax())
def test_fuzzed_parallax_parts_are_taken_or_refused_with_value_error(snap: tuple[dict, dict]) -> None:
    """A parallax part fits and is kept, or the snapshot is refused (ValueError/KeyError); a kept one
    gives the phase work consistent inputs."""
    from streaming.view.phase import collect

    state = ViewState()
    try:
        state.apply(*snap)
    except (ValueError, KeyError):
        assert state.scans() == []
        return
    scan = state.scan("k3")
    node = scan.nodes["a"].parallax
    if node is not None:
        inputs = collect(scan, final=True)
        assert inputs.parallax.counts.shape == (6, inputs.parallax.bins.count)
