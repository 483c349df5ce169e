"""Messages between the aggregator (the control point) and its forwarding processes, over one internal
ROUTER (aggregator, loopback) / DEALER (forwarder) connection: [kind, msgpack body].

    forwarder -> aggregator  [b"f.up", Up]             bound: its receiver and node addresses
                             [b"f.seen", Seen]         the first sector of a scan it has no word on
                                                       (it holds that sector and reads no more until told)
                             [b"f.progress", Progress] what it received and sent since the last report
                                                       (every few milliseconds while data flows)
    aggregator -> forwarder  [b"f.begin", Begin]       a scan begins: its plan (shape, key, routes)
                             [b"f.drop", Drop]         sectors of this scan are late or refused
                             [b"f.end", End]           the scan ended: send each node its ``end``
                             [b"f.routes", Routes]     the connected nodes changed
                             [b"f.stop", Stop]         shut down
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import msgpack
import msgspec

from streaming.protocol.control import (
    Count,
    Name,
    Names,
    NodeCount,
    ProtocolError,
    ScanNumber,
    Side,
    Text,
    validated,
)

Module = Annotated[int, msgspec.Meta(ge=0, le=3)]  # a detector module (sector) number
Thread = Annotated[list[Count], msgspec.Meta(min_length=3, max_length=3)]  # [module, thread, frames]


@dataclass(frozen=True)
class Up:
    """A forwarder is bound and serving."""

    index: Count
    receivers: list[Text]
    nodes: Text
    pid: Count


@dataclass(frozen=True)
class Seen:
    """The first sector of a scan this forwarder has no word on (the raw wire header)."""

    index: Count
    header: Annotated[bytes, msgspec.Meta(max_length=64)]


@dataclass(frozen=True)
class Progress:
    """Counts since the last report; ``key`` names the open scan ("" when none)."""

    index: Count
    key: Text = ""
    received: Count = 0
    module_received: Annotated[list[Count], msgspec.Meta(max_length=4)] = field(
        default_factory=lambda: [0, 0, 0, 0]
    )
    threads: list[Thread] = field(default_factory=list)  # new [module, thread, frames_this_thread]
    sent: dict[Count, Count] = field(default_factory=dict)  # node index -> sectors
    per_node: dict[Name, Count] = field(default_factory=dict)  # node name -> sectors
    malformed: Count = 0
    unroutable: Count = 0
    late: Count = 0
    refused: Count = 0


@dataclass(frozen=True)
class Begin:
    """A scan begins: forward its sectors by ``routes`` ([node index, node name] of the connected nodes)."""

    scan_number: ScanNumber
    key: Text
    scan_width: Side
    scan_height: Side
    expected_frames: Count
    n_nodes: NodeCount
    session_id: int
    routes: list[list[Any]]


@dataclass(frozen=True)
class Drop:
    """Sectors of this scan are dropped and counted: "late" (it ended) or "refused" (before the arm)."""

    scan_number: ScanNumber
    why: Text  # a Verdict value: "late" or "refused"


@dataclass(frozen=True)
class End:
    """The scan ended; every node gets this forwarder's ``end`` with what it sent that node."""

    scan_number: ScanNumber
    key: Text
    reason: Text  # an EndReason value
    expected: Count
    received: Count
    malformed: Count
    lost: Names = field(default_factory=list)


@dataclass(frozen=True)
class Routes:
    """The connected nodes, [index, name], in index order."""

    routes: list[list[Any]]


@dataclass(frozen=True)
class Stop:
    """Shut down."""

    reason: Text = "shutdown"


_KIND: dict[type, bytes] = {
    Up: b"f.up",
    Seen: b"f.seen",
    Progress: b"f.progress",
    Begin: b"f.begin",
    Drop: b"f.drop",
    End: b"f.end",
    Routes: b"f.routes",
    Stop: b"f.stop",
}
_TYPE = {kind: cls for cls, kind in _KIND.items()}


def encode(message: Any) -> list[bytes]:
    """[kind, msgpack body]."""
    return [_KIND[type(message)], msgpack.packb(asdict(message))]


def decode(parts: list[bytes]) -> Any:
    """The message of [kind, body]; raises ProtocolError when malformed."""
    if len(parts) != 2:
        raise ProtocolError(f"forwarder message must have 2 parts, got {len(parts)}")
    cls = _TYPE.get(bytes(parts[0]))
    if cls is None:
        raise ProtocolError(f"unknown forwarder message {bytes(parts[0])[:20]!r}")
    try:
        data = msgpack.unpackb(bytes(parts[1]), strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - any unpacking failure is a malformed body
        raise ProtocolError(f"{cls.__name__} body is not msgpack ({type(exc).__name__})") from None
    return validated(cls, data)
