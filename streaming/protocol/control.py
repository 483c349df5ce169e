"""Typed control messages between the aggregator, the node streamers and monitors.

Aggregator and nodes talk over one ROUTER (aggregator, binds) / DEALER (node, connects outbound)
connection. Every message is multipart with a kind tag first:

    node -> aggregator   [b"hello", Hello]     once after connecting (and again until welcomed)
                         [b"writer", WriterAt] node 0 only: where the scan writer it now hosts listens
                         [b"ready", Ready]     armed: may receive the next scan (sent once it knows
                                               the writer's address)
                         [b"done",  Done]      a scan is counted and handed to the writer
                         [b"hb",    Heartbeat] liveness, every heartbeat interval
    aggregator -> node   [b"welcome", Welcome] the node's index among the session's nodes, whether it
                                               hosts the scan writer, and the writer's address once
                                               known (sent again whenever that address changes)
                         [b"scan",  ScanBegin] before the first sector of a scan
                         [b"data",  sector header, sector payload]  forwarded untouched (zero-copy)
                         [b"end",   ScanEnd]   after the last sector of a scan sent to this node
                         [b"lost",  NodesLost] nodes of the open scan lost (the writer must not wait
                                               for them): taken at once, ahead of sectors it holds
                         [b"bye",   Bye]       the aggregator is shutting down

Roles come from the aggregator, so every node runs the same command: the node welcomed as index 0 hosts
the session's scan writer and announces its address with ``writer``; the aggregator hands that address to
the other nodes with their welcome (again after a reconnect, or when a restarted node 0 hosts a new
writer). A node that cannot join (all slots taken, another output directory than the writer's, another
protocol version) gets ``bye`` with the reason instead of ``welcome``, and exits with that reason.

Because one connection carries data and control in order, a node that receives ``end`` has received
every sector the aggregator sent it for that scan.

Scale-out (``streaming.aggregator_processes`` K > 1, see streaming.aggregator.forwarder): K - 1 forwarding processes
beside the aggregator each bind their own receiver and node sockets; the receivers' PUSH sockets connect to
every forwarding process (ZeroMQ spreads their sectors over them) and each node connects out to every
forwarding process too: ``welcome.data_ports`` lists their node ports (same host as the aggregator). On a
forwarder's connection a node first says [b"attach", Attach] and is answered [b"attach", Attach] (with the forwarder's ``path``); then
that connection carries [b"scan"], [b"data"] and [b"end"] exactly as the aggregator's own does, each
``end`` tagged with its ``path`` (0: the aggregator, i: forwarder i). The aggregator stays the one control
point (roles, arming, scan begin and end, routes, monitor). A node's scan ends when it has the
aggregator's ``end`` and the ``end`` of every forwarder that ``end`` names (``forwarders``).

Routing: frame f goes to its home node ``f % n_nodes`` while that node is connected; the frames of a node
that is not go to the connected ones in turn (``route_live``). A node lost mid-scan (disconnect,
heartbeat timeout) is taken out of ``live`` at once, so the survivors get its share of later frames (and
only its share: no frame moves between two survivors, which could split it in two); its
name is in the scan's ``end`` (``lost``) and the nodes pass it to the writer, which then does not wait for
it. Monitors subscribe to the aggregator's PUB socket and
receive [b"state", AggregatorState] with a heartbeat.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, TypeVar

import msgpack
import msgspec

from counting.errors import PermanentError

HELLO = b"hello"
READY = b"ready"
DONE = b"done"
HEARTBEAT = b"hb"
WELCOME = b"welcome"
SCAN = b"scan"
DATA = b"data"
END = b"end"
BYE = b"bye"
STATE = b"state"
WRITER = b"writer"
ATTACH = b"attach"
LOST = b"lost"

PROTOCOL_VERSION = 3


class ProtocolError(PermanentError, ValueError):
    """A control message is malformed."""


# Field types with ranges, checked by ``decode`` (msgspec validates a decoded body against the annotations;
# the wire stays the plain msgpack map of the dataclass).
Count = Annotated[int, msgspec.Meta(ge=0)]  # counters, pids, indices
ScanNumber = Annotated[int, msgspec.Meta(ge=-1, le=0xFFFFFFFF)]  # the wire's uint32; -1: none yet
Side = Annotated[int, msgspec.Meta(ge=1, le=0xFFFF)]  # a scan's width or height (the wire's uint16)
NodeCount = Annotated[int, msgspec.Meta(ge=1, le=0xFFFF)]  # frames are routed modulo this
Name = Annotated[str, msgspec.Meta(max_length=255)]  # a node's name
Text = Annotated[str, msgspec.Meta(max_length=4096)]  # addresses, paths, keys, reasons
Names = Annotated[list[Name], msgspec.Meta(max_length=0xFFFF)]


@dataclass(frozen=True)
class Hello:
    """A node introduces itself."""

    name: Name
    pid: Count
    protocol: int = PROTOCOL_VERSION
    output_dir: Text = ""  # where this node would write scans if it hosted the writer


@dataclass(frozen=True)
class WriterAt:
    """Node 0 hosts the scan writer, listening here."""

    name: Name
    address: Text
    output_dir: Text


@dataclass(frozen=True)
class Ready:
    """A node is armed for the next scan."""

    name: Name
    last_scan: ScanNumber = -1


@dataclass(frozen=True)
class Done:
    """A node finished a scan: what it received and counted."""

    name: Name
    scan_number: ScanNumber
    sectors: Count
    frames: Count
    incomplete_frames: Count
    reason: Text  # an EndReason value


@dataclass(frozen=True)
class Heartbeat:
    """Liveness plus a few counters."""

    name: Name
    state: Text
    scan_number: ScanNumber = -1


@dataclass(frozen=True)
class Welcome:
    """The aggregator accepted a node."""

    node_index: Count
    n_nodes: NodeCount
    session_id: int = 0
    host_writer: bool = False  # this node hosts the session's scan writer (node 0)
    writer: Text = ""  # the scan writer's address; empty until node 0 has announced it
    data_ports: list[int] = field(default_factory=list)  # forwarders' node ports (aggregator's host)


@dataclass(frozen=True)
class Attach:
    """A node on a forwarder's connection (and the forwarder's answer): sectors for this name come here."""

    name: Name
    path: Count = 0  # in the answer: the forwarder's number


@dataclass(frozen=True)
class ScanBegin:
    """A scan starts: its shape and how frames are routed."""

    scan_number: ScanNumber
    scan_width: Side
    scan_height: Side
    expected_frames: Count  # frames in the whole scan (all nodes); 0 if unknown
    node_index: Count
    n_nodes: NodeCount
    session_id: int = 0
    scan_key: Text = ""  # unique per scan the aggregator begins, even when a scan number comes again


@dataclass(frozen=True)
class ScanEnd:
    """No more sectors of this scan will be sent to this node."""

    scan_number: ScanNumber
    sectors_sent: Count  # sectors the aggregator sent to this node in this scan
    reason: Text  # an EndReason value (streaming.protocol.reasons): complete, deadline, superseded, shutdown
    sectors_expected: Count = 0  # for the whole scan, all nodes
    sectors_received: Count = 0  # by the aggregator, whole scan
    malformed: Count = 0  # messages rejected during this scan
    path: Count = 0  # who sends this end: 0 the aggregator, i forwarder i (each counts what it sent)
    forwarders: list[int] = field(default_factory=list)  # aggregator's end: forwarders whose end follows
    lost: Names = field(default_factory=list)  # nodes lost during this scan: the writer waits not


@dataclass(frozen=True)
class NodesLost:
    """Nodes the aggregator lost while this scan streams: they will offer no samples and report nothing,
    so the writer must not wait for them (sent at once, not only in the scan's end, which may sit behind
    sectors that wait for the very thresholds the writer would wait for)."""

    scan_number: ScanNumber
    scan_key: Text
    lost: Names


@dataclass(frozen=True)
class Bye:
    """The aggregator is going away."""

    reason: Text = "shutdown"
    final: bool = (
        True  # False: a refusal that may clear (all slots taken while a lost node is not yet noticed)
    )


@dataclass(frozen=True)
class AggregatorState:
    """What monitors see: state, counters, per-node counters."""

    state: Text
    scan_number: ScanNumber
    nodes_connected: Count
    nodes_ready: Count
    n_nodes: Count
    received: Count
    forwarded: Count
    malformed: Count
    unroutable: Count
    per_node: dict[str, int] = field(default_factory=dict)
    time: float = 0.0
    late: Count = 0  # sectors of an already-ended scan, dropped
    writer: Text = ""  # name of the node that hosts the scan writer ("" until designated)
    refused: Count = 0  # sectors of scans that began before every node was first ready
    scan_expected: Count = 0  # sectors expected of the open scan (0: none open)
    scan_received: Count = 0  # ...and received so far
    refused_scans: dict[int, int] = field(default_factory=dict)  # those scans: number -> sectors
    per_path: dict[int, dict[str, int]] = field(default_factory=dict)  # 0: aggregator, i: forwarder i
    paths_lost: dict[int, Text] = field(default_factory=dict)  # forwarding processes that exited: i -> why


# Node streamers -> the scan writer (one per session), over DEALER -> ROUTER:
#   [b"w.begin", NodeScanBegin]                               a node starts a scan
#   [b"w.samples", SampleHeader, frames bytes]                 threshold samples (estimated thresholds)
#   [b"w.events", EventsHeader, positions, numbers, masks, offsets, indices]   counted frames
#   [b"w.done", NodeScanDone]                                 a node has sent everything of a scan
# and back, writer -> node: [b"w.thresholds", ScanThresholds]
W_BEGIN = b"w.begin"
W_SAMPLES = b"w.samples"
W_EVENTS = b"w.events"
W_DONE = b"w.done"
W_THRESHOLDS = b"w.thresholds"


@dataclass(frozen=True)
class NodeScanBegin:
    """A node streamer starts a scan."""

    name: Name
    scan_number: ScanNumber
    scan_width: Side
    scan_height: Side
    n_nodes: NodeCount
    node_index: Count
    session_id: int = 0
    scan_key: Text = ""


@dataclass(frozen=True)
class SampleHeader:
    """Complete frames offered for threshold estimation; ``last`` closes this node's offer for the scan."""

    name: Name
    scan_number: ScanNumber
    frame_numbers: list[int]
    last: bool
    scan_key: Text = ""
    lost: Names = field(default_factory=list)  # nodes lost mid-scan: their offers will never close


@dataclass(frozen=True)
class EventsHeader:
    """Counted frames follow as arrays: positions int64, frame numbers int64, masks uint8, offsets int64,
    indices uint32."""

    name: Name
    scan_number: ScanNumber
    frames: Count
    scan_key: Text = ""


@dataclass(frozen=True)
class NodeScanDone:
    """A node has sent every counted frame of a scan."""

    name: Name
    scan_number: ScanNumber
    sectors: Count  # sectors this node received
    # sectors the aggregator says it sent to this node; -1: not known (the node ended the scan without the
    # aggregator's end: its own deadline, the aggregator gone or a new scan first)
    sectors_sent: Annotated[int, msgspec.Meta(ge=-1)]
    frames: Count
    incomplete_frames: Count
    duplicates: Count
    reason: Text  # an EndReason value
    counting_seconds: float = 0.0
    late_sectors: Count = 0  # sectors of frames already sealed incomplete, dropped
    evicted_slots: Count = 0  # batches sealed early because their frames waited too long
    scan_key: Text = ""
    lost: Names = field(default_factory=list)  # nodes the aggregator lost during the scan


@dataclass(frozen=True)
class ScanThresholds:
    """Thresholds every node counts a scan with."""

    scan_number: ScanNumber
    background: float
    xray: float
    metadata: dict = field(default_factory=dict)
    calibration: Text = ""  # digest of the dark and gain that follow as two binary parts (empty: none)


_KIND = {
    Hello: HELLO,
    WriterAt: WRITER,
    Ready: READY,
    Done: DONE,
    Heartbeat: HEARTBEAT,
    Welcome: WELCOME,
    ScanBegin: SCAN,
    ScanEnd: END,
    Bye: BYE,
    AggregatorState: STATE,
    NodeScanBegin: W_BEGIN,
    SampleHeader: W_SAMPLES,
    EventsHeader: W_EVENTS,
    NodeScanDone: W_DONE,
    ScanThresholds: W_THRESHOLDS,
    Attach: ATTACH,
    NodesLost: LOST,
}
_TYPE = {kind: cls for cls, kind in _KIND.items()}

T = TypeVar("T")


def encode(message: Any) -> list[bytes]:
    """[kind, msgpack body] for a control message."""
    return [_KIND[type(message)], msgpack.packb(asdict(message))]


def decode(kind: bytes, body: bytes | memoryview, expected: type[T] | None = None) -> Any:
    """Decode a control message body of the given kind; raises ProtocolError when malformed."""
    cls = _TYPE.get(bytes(kind))
    if cls is None:
        raise ProtocolError(f"unknown message kind {bytes(kind)[:20]!r}")
    if expected is not None and cls is not expected:
        raise ProtocolError(f"expected {expected.__name__}, got {cls.__name__}")
    try:
        data = msgpack.unpackb(bytes(body), strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - any unpacking failure is a malformed body
        raise ProtocolError(f"{cls.__name__} body is not msgpack ({type(exc).__name__})") from None
    return validated(cls, data)


def validated(cls: type[T], data: object) -> T:
    """``data`` (an unpacked msgpack body) as a ``cls`` whose every field has its annotated type and range;
    raises ProtocolError otherwise (unknown or missing fields, bools for ints, out-of-range values)."""
    if not isinstance(data, dict) or not set(data) <= _fields(cls):
        raise ProtocolError(f"{cls.__name__} body has unexpected fields")
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{cls.__name__} body is invalid: {exc}") from None


_FIELDS: dict[type, frozenset[str]] = {}


def _fields(cls: type) -> frozenset[str]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in fields(cls))
    return names


def route_live(frame_number: int, live: list[int], n_nodes: int) -> int:
    """The node a frame goes to among the connected ones (their indices, in order), of ``n_nodes`` slots.

    Every frame keeps its home node ``f % n_nodes`` while that node is connected; only a lost node's frames
    move, spread evenly over the connected ones. So losing a node never moves a frame between two
    survivors: a frame whose first sectors went to one survivor never has its last ones sent to another
    (which would split it into two partial frames at one position)."""
    home = frame_number % n_nodes
    if home in live:
        return home
    return live[(frame_number // n_nodes) % len(live)]


def route(frame_number: int, n_nodes: int) -> int:
    """The node a frame goes to: all four sectors of a frame share a frame number, so they go together."""
    return frame_number % n_nodes
