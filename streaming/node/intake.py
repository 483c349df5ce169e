"""A node's sector intake: the data messages the aggregator (or a forwarding process) sends it, each
[b"data", header, payload], checked and placed into their frames.

A message is read part by part: its small header first, then, once the header says where the sector
goes, its 165,888-byte payload straight into that place in the slot (``Socket.recv_into``: libzmq's one
copy, no message object, array or view made per sector). A payload that is not kept (a stray, late or
duplicate sector, or a malformed message) lands in a fixed scratch buffer. Every check of the older
whole-message path still holds, and in the same order: a message of the wrong number of parts, an invalid
header or a payload of the wrong size is malformed, whatever else is wrong with it; then a sector of no
open scan is stray; then a scan size unlike the scan's is malformed. A sector that needs a slot when none
is free is held whole (``place`` takes it again later).
"""

from __future__ import annotations

from collections.abc import Callable

import zmq

from counting.geometry import SECTOR_BYTES
from streaming.node.assembly import FrameAssembler, Sealed
from streaming.node.config import NodeCounters
from streaming.node.hold_queue import HoldQueue
from streaming.node.scan import NodeScan
from streaming.protocol import control as p
from streaming.protocol.sector import WireError, decode_message, header_fields

# Plain ints: pyzmq's enum flag arithmetic costs more per call than the call itself.
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_STRAY = "stray"
_MALFORMED = "malformed"


class SectorIntake:
    """Checks and places data messages; counts what it drops in the node's counters."""

    def __init__(
        self,
        assembler: FrameAssembler,
        counters: NodeCounters,
        held: HoldQueue,
        sealed: Callable[[Sealed], None],
    ) -> None:
        self.assembler, self.counters, self.held, self._sealed = assembler, counters, held, sealed
        self._scratch = memoryview(bytearray(SECTOR_BYTES))  # where a payload not kept lands: fixed size
        self._nothing = bytearray()  # receiving into it discards a part

    def receive(self, sock: zmq.Socket, scan: NodeScan | None) -> None:
        """The rest of a data message whose first part was just read from ``sock``; the payload goes
        straight into its place when the sector is kept."""
        if not sock.get(_RCVMORE):
            self.counters.malformed += 1  # [b"data"] alone
            return
        raw = sock.recv(_NOBLOCK)
        if not sock.get(_RCVMORE):
            self.counters.malformed += 1  # no payload
            return
        try:
            number, frame, _, width, height, x, y, _, module = header_fields(raw)
        except WireError:
            verdict, target = _MALFORMED, None
        else:
            verdict, target = self._check(number, width, height, scan), None
            if verdict is None:
                if not self.assembler.has_room_for(frame):
                    self._hold(sock, raw)
                    return
                target = self.assembler.destination(frame, module)  # None: a duplicate or late sector
        size = sock.recv_into(self._scratch if target is None else target, flags=_NOBLOCK)
        if sock.get(_RCVMORE):
            self._discard_rest(sock)
            verdict = _MALFORMED  # more than three parts
        elif size != SECTOR_BYTES:
            verdict = _MALFORMED  # what was written to the sector's place is harmless: it is not placed
        if verdict is None:
            self._place(frame, y * width + x, module, scan)
        else:
            self._count(verdict)

    def place(self, parts: list, scan: NodeScan | None, hold: bool = False) -> bool:
        """A whole data message (held, or read as parts); returns False when it needs a slot and none is
        free (it is then held, unless it came from the hold queue: ``hold``)."""
        if len(parts) != 3:
            self.counters.malformed += 1
            return True
        try:
            h, payload = decode_message(parts[1:])
        except WireError:
            self.counters.malformed += 1
            return True
        verdict = self._check(h.scan_number, h.scan_width, h.scan_height, scan)
        if verdict is not None:
            self._count(verdict)
            return True
        if not self.assembler.has_room_for(h.frame_number):
            # Sectors of frames already in flight may still arrive behind this one: keep reading.
            if not hold:
                self.held.hold(p.DATA, parts)
            return False
        target = self.assembler.destination(h.frame_number, h.module)
        if target is not None:
            target[:] = payload
        self._place(h.frame_number, h.position, h.module, scan)
        return True

    @staticmethod
    def _check(number: int, width: int, height: int, scan: NodeScan | None) -> str | None:
        """None when a sector belongs to the open scan; else why not (stray, malformed)."""
        if scan is None or scan.end is not None or number != scan.number:
            return _STRAY
        if width != scan.begin.scan_width or height != scan.begin.scan_height:
            return _MALFORMED
        return None

    def _count(self, verdict: str) -> None:
        if verdict is _STRAY:
            self.counters.stray += 1
        else:
            self.counters.malformed += 1

    def _place(self, frame: int, position: int, module: int, scan: NodeScan) -> None:
        scan.sectors += 1
        self.counters.sectors += 1
        for s in self.assembler.placed(frame, position, module):
            self._sealed(s)

    def _hold(self, sock: zmq.Socket, raw: bytes) -> None:
        """Keep the message whole for later (a payload of the wrong size, or more parts, is malformed)."""
        payload = sock.recv(_NOBLOCK, copy=False)
        if sock.get(_RCVMORE):
            self._discard_rest(sock)
            self.counters.malformed += 1
        elif len(payload) != SECTOR_BYTES:
            self.counters.malformed += 1
        else:
            self.held.hold(p.DATA, [p.DATA, raw, payload])

    def _discard_rest(self, sock: zmq.Socket) -> None:
        while sock.get(_RCVMORE):
            sock.recv_into(self._nothing, flags=_NOBLOCK)


def rest_of_message(sock: zmq.Socket, first: bytes) -> list:
    """A message whose first part was just read, whole: [first, *the other parts as zmq.Frame]."""
    parts: list = [first]
    while sock.get(_RCVMORE):
        parts.append(sock.recv(_NOBLOCK, copy=False))
    return parts
