"""The 4D Camera receivers' wire format: one sector per 2-part ZeroMQ message.

Part 1 is a msgpack positional array of 9 unsigned ints, exactly as the detector's receivers send it:
``[scan_number, frame_number, num_frames_this_thread, nSTEM_positions_per_row_m1, nSTEM_rows_m1,
STEM_x_position_in_row, STEM_row_in_scan, thread_id, module]``. Despite the ``_m1`` names the two scan
fields carry the scan width and height themselves (stempy reads them so). Part 2 is the raw 144x576
uint16 little-endian sector, 165,888 bytes. Wire names are translated once, here.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from counting.errors import PermanentError
from counting.geometry import N_SECTORS, SECTOR_BYTES

HEADER_FIELDS = 9
_UINT32_MAX = 2**32 - 1
_UINT16_MAX = 2**16 - 1
_INT_ONLY = {int}
# ZMQ_MAXMSGSIZE of every data-path socket (receivers, aggregator <-> node, forwarders): a sector payload
# plus headroom; headers and control messages are far smaller. A peer sending more is disconnected by ZeroMQ.
MAX_MESSAGE_BYTES = SECTOR_BYTES + 64 * 1024


class WireError(PermanentError, ValueError):
    """A message is not a valid sector message; the reason says which check failed."""


@dataclass(frozen=True, slots=True)
class SectorHeader:
    """One sector's identity, with readable names for the receivers' fields."""

    scan_number: int
    frame_number: int
    frames_this_thread: int  # num_frames_this_thread: frames this receiver thread sends in the scan
    scan_width: int  # nSTEM_positions_per_row_m1
    scan_height: int  # nSTEM_rows_m1
    x: int  # STEM_x_position_in_row
    y: int  # STEM_row_in_scan
    thread_id: int
    module: int

    @property
    def position(self) -> int:
        """Row-major scan position, as stempy numbers it."""
        return self.y * self.scan_width + self.x

    def encode(self) -> bytes:
        """msgpack positional array, the form the receivers send."""
        # Spelled out: dataclasses.astuple deep-copies and cost ~50 us per sector.
        return msgpack.packb(
            [
                self.scan_number,
                self.frame_number,
                self.frames_this_thread,
                self.scan_width,
                self.scan_height,
                self.x,
                self.y,
                self.thread_id,
                self.module,
            ]
        )


_LIMITS = (
    ("scan_number", _UINT32_MAX),
    ("frame_number", _UINT32_MAX),
    ("frames_this_thread", _UINT32_MAX),
    ("scan_width", _UINT16_MAX),
    ("scan_height", _UINT16_MAX),
    ("x", _UINT16_MAX),
    ("y", _UINT16_MAX),
    ("thread_id", _UINT16_MAX),
    ("module", N_SECTORS - 1),
)


def decode_header(raw: bytes | memoryview) -> SectorHeader:
    """Decode and validate a header part; raises WireError with the reason."""
    return SectorHeader(*header_fields(raw))


def header_fields(raw: bytes | memoryview) -> list[int]:
    """Decode and validate a header part, its 9 fields in wire order (no SectorHeader made: the node's
    per-sector path); raises WireError with the reason."""
    try:
        fields = msgpack.unpackb(raw, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise WireError(f"header is not msgpack ({type(exc).__name__})") from None
    # The common case in a few operations (bool is not int here; an OR of non-negative ints stays below
    # 2**k exactly when each does); anything else takes the checks that name what is wrong.
    if type(fields) is list and len(fields) == HEADER_FIELDS and set(map(type, fields)) == _INT_ONLY:
        number, frame, frames, width, height, x, y, thread, module = fields
        if (
            number | frame | frames | width | height | x | y | thread | module >= 0
            and number | frame | frames <= _UINT32_MAX
            and width | height | x | y | thread <= _UINT16_MAX
            and module < N_SECTORS
            and x < width
            and y < height
        ):
            return fields
    _check_fields(fields)
    return fields


def _check_fields(fields: object) -> None:
    if not isinstance(fields, list) or len(fields) != HEADER_FIELDS:
        raise WireError(f"header must be an array of {HEADER_FIELDS} unsigned ints, got {_describe(fields)}")
    for (name, limit), value in zip(_LIMITS, fields, strict=True):
        if type(value) is not int or value < 0 or value > limit:
            raise WireError(f"header field {name}={value!r} is not an unsigned int <= {limit}")
    width, height, x, y = fields[3:7]
    if width == 0 or height == 0:
        raise WireError("header scan size is zero")
    if x >= width or y >= height:
        raise WireError(f"header position ({x}, {y}) is outside the {width}x{height} scan")


def check_payload(payload: bytes | memoryview) -> None:
    """A sector payload must be exactly 144*576 uint16 (165,888 bytes)."""
    size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
    if size != SECTOR_BYTES:
        raise WireError(f"sector payload is {size} bytes, expected {SECTOR_BYTES}")


def decode_message(parts: list) -> tuple[SectorHeader, memoryview]:
    """Validate a 2-part sector message (bytes or zmq.Frame parts); returns header and payload view."""
    if len(parts) != 2:
        raise WireError(f"sector message must have 2 parts, got {len(parts)}")
    header = decode_header(_buffer(parts[0]))
    payload = _buffer(parts[1])
    check_payload(payload)
    return header, payload


def _buffer(part: object) -> memoryview:
    buf = getattr(part, "buffer", part)  # zmq.Frame exposes .buffer; bytes work as they are
    return memoryview(buf)


def _describe(value: object) -> str:
    if isinstance(value, list):
        return f"an array of {len(value)}"
    return type(value).__name__
