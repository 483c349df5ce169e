"""The sector wire format: round trips, every field's range check, and fuzzed garbage."""

from __future__ import annotations

import contextlib
from dataclasses import astuple, replace

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from counting.geometry import N_SECTORS, SECTOR_BYTES
from streaming.protocol.sector import HEADER_FIELDS, SectorHeader, WireError, decode_header, decode_message

pytestmark = pytest.mark.timeout(60)

GOOD = SectorHeader(
    scan_number=7,
    frame_number=123456,
    frames_this_thread=4096,
    scan_width=64,
    scan_height=32,
    x=63,
    y=31,
    thread_id=2,
    module=3,
)
LIMITS = {
    "scan_number": 2**32 - 1,
    "frame_number": 2**32 - 1,
    "frames_this_thread": 2**32 - 1,
    "scan_width": 2**16 - 1,
    "scan_height": 2**16 - 1,
    "x": 2**16 - 1,
    "y": 2**16 - 1,
    "thread_id": 2**16 - 1,
    "module": N_SECTORS - 1,
}
PAYLOAD = np.arange(SECTOR_BYTES // 2, dtype="<u2").tobytes()


def packed(**changes: object) -> bytes:
    """GOOD's header with some fields replaced by arbitrary values (bypassing the dataclass)."""
    fields = dict(zip(LIMITS, astuple(GOOD)))
    fields.update(changes)
    return msgpack.packb(list(fields.values()))


def test_round_trip() -> None:
    header, payload = decode_message([GOOD.encode(), PAYLOAD])
    assert header == GOOD
    assert payload.nbytes == SECTOR_BYTES and bytes(payload) == PAYLOAD
    assert GOOD.position == 31 * 64 + 63


def test_round_trip_through_zmq_frames() -> None:
    """The aggregator decodes received zmq.Frame parts without copying the payload."""
    header, payload = decode_message([zmq.Frame(GOOD.encode()), zmq.Frame(PAYLOAD)])
    assert header == GOOD and bytes(payload) == PAYLOAD


def test_header_is_the_receivers_positional_array() -> None:
    assert msgpack.unpackb(GOOD.encode()) == [7, 123456, 4096, 64, 32, 63, 31, 2, 3]


@pytest.mark.parametrize("name", list(LIMITS))
def test_each_field_upper_limit(name: str) -> None:
    top = LIMITS[name]
    wide = {"scan_width": 2**16 - 1, "scan_height": 2**16 - 1}
    # x and y must also be inside the scan, so their largest valid value is one less.
    largest = top - 1 if name in ("x", "y") else top
    assert getattr(decode_header(packed(**{**wide, name: largest})), name) == largest
    with pytest.raises(WireError, match=name):
        decode_header(packed(**{**wide, name: top + 1}))


@pytest.mark.parametrize("name", list(LIMITS))
@pytest.mark.parametrize("bad", [-1, 1.0, True, "1", None, [1]])
def test_each_field_must_be_an_unsigned_int(name: str, bad: object) -> None:
    with pytest.raises(WireError, match=name):
        decode_header(packed(**{name: bad}))


def test_scan_size_and_position_checks() -> None:
    with pytest.raises(WireError, match="zero"):
        decode_header(packed(scan_width=0, x=0))
    with pytest.raises(WireError, match="zero"):
        decode_header(packed(scan_height=0, y=0))
    with pytest.raises(WireError, match="outside"):
        decode_header(packed(x=64))
    with pytest.raises(WireError, match="outside"):
        decode_header(packed(y=32))


@pytest.mark.parametrize(
    "parts",
    [
        [],
        [GOOD.encode()],
        [GOOD.encode(), PAYLOAD, b""],
        [GOOD.encode(), PAYLOAD[:-2]],
        [GOOD.encode(), PAYLOAD + b"\0\0"],
        [GOOD.encode(), b""],
        [b"", PAYLOAD],
        [b"\xc1", PAYLOAD],
        [msgpack.packb(list(astuple(GOOD))[:8]), PAYLOAD],  # the old 8-field header
        [msgpack.packb([*astuple(GOOD), 0]), PAYLOAD],
        [msgpack.packb(dict(zip(LIMITS, astuple(GOOD)))), PAYLOAD],  # a map, not an array
        [msgpack.packb(list(astuple(GOOD))) + b"\x00", PAYLOAD],  # trailing bytes
    ],
)
def test_malformed_messages(parts: list) -> None:
    with pytest.raises(WireError):
        decode_message(parts)


def test_frozen_header() -> None:
    with pytest.raises(AttributeError):
        GOOD.x = 1  # type: ignore[misc]
    assert replace(GOOD, x=0).x == 0


# ------------------------------------------------------------------------------------------- fuzzing
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=12) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=24,
)
field_values = st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.sampled_from([0, 1, 2**16, 2**32])


def _accepted(header: SectorHeader) -> None:
    """If garbage happens to decode, it must satisfy every check."""
    for name, top in LIMITS.items():
        assert 0 <= getattr(header, name) <= top
    assert header.x < header.scan_width and header.y < header.scan_height


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=64))
def test_fuzz_raw_bytes_header(raw: bytes) -> None:
    with contextlib.suppress(WireError):  # garbage may decode only if it passes every check
        _accepted(decode_header(raw))


@settings(max_examples=300, deadline=None)
@given(value=msgpack_values)
def test_fuzz_msgpack_objects_header(value: object) -> None:
    with contextlib.suppress(WireError):  # garbage may decode only if it passes every check
        _accepted(decode_header(msgpack.packb(value)))


@settings(max_examples=300, deadline=None)
@given(fields=st.lists(field_values, min_size=HEADER_FIELDS, max_size=HEADER_FIELDS))
def test_fuzz_nine_int_headers(fields: list[int]) -> None:
    with contextlib.suppress(WireError):  # garbage may decode only if it passes every check
        _accepted(decode_header(msgpack.packb(fields)))


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=64) | st.just(PAYLOAD) | st.just(GOOD.encode()), max_size=4),
    size=st.integers(min_value=0, max_value=SECTOR_BYTES + 4),
)
def test_fuzz_messages(parts: list[bytes], size: int) -> None:
    """Any message is either a valid sector or a WireError; payloads of any other size are refused."""
    try:
        header, payload = decode_message(parts)
    except WireError:
        pass
    else:
        _accepted(header)
        assert payload.nbytes == SECTOR_BYTES
    if size != SECTOR_BYTES:
        with pytest.raises(WireError, match="payload"):
            decode_message([GOOD.encode(), bytes(size)])
